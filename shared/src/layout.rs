//! The parallel layout of a training run (TP, PP, EP, CP, DP, virtual
//! pipeline stages) checked against the model, and which pipeline stage
//! holds a layer: mem-plan's and mofa-predict's, on the record type
//! [`crate::records::Layout`] that mem-plan's summary prints.

use crate::model::ModelConfig;
use crate::records::Layout;
use crate::Result;

impl Layout {
    /// The layout, refused (exit 2, the flag named) when a degree is 0, EP
    /// does not divide the experts or DP × CP, or PP × VPP exceeds the layers.
    pub fn new(
        tp: u64,
        pp: u64,
        ep: u64,
        cp: u64,
        dp: u64,
        vpp: u64,
        m: &ModelConfig,
    ) -> Result<Layout> {
        for (v, f) in [
            (tp, "--tp"),
            (pp, "--pp"),
            (ep, "--ep"),
            (cp, "--cp"),
            (dp, "--dp"),
            (vpp, "--vpp"),
        ] {
            if v == 0 {
                crate::bail!("{f} must be at least 1");
            }
        }
        if let Some(moe) = &m.moe {
            if !moe.experts.is_multiple_of(ep) {
                crate::bail!(
                    "--ep {ep} does not divide the model's {} experts",
                    moe.experts
                );
            }
        } else if ep > 1 {
            crate::bail!("--ep {ep} given but the model has no experts");
        }
        if !(dp * cp).is_multiple_of(ep) {
            crate::bail!(
                "--ep {ep} must divide --dp × --cp = {} (Megatron-LM forms expert-parallel groups inside the data × context parallel ranks)",
                dp * cp
            );
        }
        if pp * vpp > m.layers {
            crate::bail!(
                "--pp {pp} × --vpp {vpp} exceeds the model's {} layers",
                m.layers
            );
        }
        if vpp > 1 && pp == 1 {
            crate::bail!(
                "--vpp needs --pp > 1 (interleaving splits a pipeline stage into model chunks)"
            );
        }
        Ok(Layout {
            tp,
            pp,
            ep,
            cp,
            dp,
            vpp,
            world: tp * pp * cp * dp,
        })
    }

    /// Pipeline rank holding layer `i`: layers split into pp·vpp contiguous
    /// model chunks (remainder to the first chunks); chunk j runs on rank j mod pp.
    pub fn stage_of(&self, layers: u64, i: u64) -> u64 {
        let chunks = self.pp * self.vpp;
        // chunk j holds [j*L/chunks, (j+1)*L/chunks)
        let j = (0..chunks)
            .find(|&j| i < (j + 1) * layers / chunks)
            .unwrap_or(chunks - 1);
        j % self.pp
    }
}
