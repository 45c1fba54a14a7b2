//! FedRA (arXiv 2311.11227; github leondada/FedRA, `server.py`):
//! the per-round random layer allocation and the layer-by-layer mapping of a
//! client's (shallower) model onto the global layers.
//!
//! Allocation, as `Server.get_para_range` draws it: every round, for every
//! client i independently, `L_i` distinct layers out of `L`, uniformly
//! without replacement (nothing forces every layer to be covered). The public
//! code uses numpy's global `RandomState`; ftk draws from its own seeded
//! ChaCha stream per (round, client), so the distribution is the same but
//! not the bit stream.
//!
//! Aggregation, as `agg_range_fill` does it: client i's local block t is
//! global block `j_t`, the t-th held layer in increasing order; each global
//! layer's tensors are the unweighted mean over the clients that held it,
//! and a layer nobody held keeps its previous global value.

use ftk::io::Input;
use ftk::jsonl::Reader;
use ftk::records::{self, FedraAlloc};
use ftk::{bail, Error, Result};
use rand::RngExt;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Client capacities: N values, one value for all, or K values each
/// repeated N/K times (the public code's `clients_for_eachdomain`).
pub fn expand_capacity(cap: &[usize], clients: usize, layers: usize) -> Result<Vec<usize>> {
    if clients == 0 || layers == 0 {
        bail!("--clients and --layers must be at least 1");
    }
    if cap.is_empty() {
        bail!("--capacity needs at least one per-client layer count");
    }
    let out: Vec<usize> = if cap.len() == clients {
        cap.to_vec()
    } else if cap.len() == 1 {
        vec![cap[0]; clients]
    } else if clients.is_multiple_of(cap.len()) {
        let rep = clients / cap.len();
        cap.iter()
            .flat_map(|&c| std::iter::repeat_n(c, rep))
            .collect()
    } else {
        bail!(
            "--capacity has {} values for {clients} clients; give 1, {clients}, or a divisor of {clients} (each value then covers consecutive clients)",
            cap.len()
        );
    };
    if let Some(c) = out.iter().find(|&&c| c == 0 || c > layers) {
        bail!("--capacity {c} is outside 1..={layers} (the number of layers)");
    }
    Ok(out)
}

/// Draw round `round`'s allocation.
pub fn allocate(capacity: &[usize], layers: usize, round: u64, seed: u64) -> Vec<FedraAlloc> {
    capacity
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let mut rng = ftk::rng::stream(seed, ftk::rng::stream_id(&[round, i as u64]));
            // Partial Fisher-Yates: the first c entries are a uniform
            // c-subset of 0..layers.
            let mut idx: Vec<usize> = (0..layers).collect();
            for k in 0..c {
                let j = rng.random_range(k..layers);
                idx.swap(k, j);
            }
            let mut held = idx[..c].to_vec();
            held.sort_unstable();
            let mut mask = vec![0u8; layers];
            held.iter().for_each(|&l| mask[l] = 1);
            FedraAlloc {
                kind: Default::default(),
                round,
                client: i,
                cid: i.to_string(),
                num_layers: layers,
                capacity: c,
                layers: held,
                mask,
            }
        })
        .collect()
}

/// An allocation read back: held layers per cid.
#[derive(Debug, Clone)]
pub struct Alloc {
    pub num_layers: usize,
    pub held: BTreeMap<String, Vec<usize>>,
}

/// Read `fedra_alloc` records (other kinds are skipped).
pub fn read_alloc(path: &Path) -> Result<Alloc> {
    let input = Input::open(path)?;
    let mut r = Reader::new(input.name.clone(), input.reader);
    let mut held = BTreeMap::new();
    let mut num_layers = None;
    while let Some(rec) = records::next::<FedraAlloc, _>(&mut r)? {
        if *num_layers.get_or_insert(rec.num_layers) != rec.num_layers {
            bail!(
                "{}: num_layers {} differs from earlier rows",
                r.here(),
                rec.num_layers
            );
        }
        let mut l = rec.layers.clone();
        l.sort_unstable();
        l.dedup();
        if l.len() != rec.layers.len() || l.iter().any(|&x| x >= rec.num_layers) {
            bail!(
                "{}: layers {:?} must be distinct and below num_layers {}",
                r.here(),
                rec.layers,
                rec.num_layers
            );
        }
        if held.insert(rec.cid.clone(), l).is_some() {
            bail!(
                "{}: client '{}' has two allocation rows; give one round's allocation",
                r.here(),
                rec.cid
            );
        }
    }
    let Some(num_layers) = num_layers else {
        bail!(
            "{}: no fedra_alloc records (make them with `fed-aggregate fedra-alloc`)",
            r.source()
        );
    };
    Ok(Alloc { num_layers, held })
}

/// Check a layer regex has a capture group for the index.
pub fn layer_regex(pat: &str) -> Result<Regex> {
    let re = Regex::new(pat).map_err(|e| {
        Error::input(format!(
            "--layer-pattern '{pat}' is not a valid regex: {}",
            regex_error(&e)
        ))
    })?;
    if re.captures_len() < 2 {
        bail!("--layer-pattern '{pat}' needs a capture group for the layer index, e.g. 'layers\\.(\\d+)\\.'");
    }
    Ok(re)
}

/// The last line of a regex error (the crate's messages span several lines).
pub fn regex_error(e: &regex::Error) -> String {
    let m = e.to_string();
    m.lines()
        .last()
        .unwrap_or("")
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

fn layer_of(re: &Regex, name: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let c = re.captures(name)?;
    let m = c.get(1)?;
    Some((m.as_str().parse().ok()?, m.range()))
}

/// Map a client's (out name, file name) pairs to global layer numbering.
/// A client file may number its layers globally (exactly its held layers)
/// or locally (0..L_i, as the public code's shallower client models do).
pub fn map_names(
    re: &Regex,
    alloc: &Alloc,
    cid: &str,
    label: &str,
    names: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let held = alloc.held.get(cid).ok_or_else(|| {
        Error::input(format!("{label}: no allocation row for this cid in --alloc; the manifest's cids must match fedra-alloc's"))
    })?;
    let in_file: BTreeSet<usize> = names
        .iter()
        .filter_map(|(n, _)| layer_of(re, n).map(|p| p.0))
        .collect();
    let held_set: BTreeSet<usize> = held.iter().copied().collect();
    let local: BTreeSet<usize> = (0..held.len()).collect();
    let to_global: Box<dyn Fn(usize) -> usize> = if in_file == held_set {
        Box::new(|l| l)
    } else if in_file == local {
        Box::new(|l| held[l])
    } else {
        return Err(Error::input(format!(
            "{label}: holds layers {in_file:?}, but the allocation gives it {held:?}; expected those indices, or local indices 0..{}",
            held.len()
        )));
    };
    Ok(names
        .into_iter()
        .map(|(out, file)| match layer_of(re, &out) {
            Some((l, r)) => (
                format!("{}{}{}", &out[..r.start], to_global(l), &out[r.end..]),
                file,
            ),
            None => (out, file),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_rows_are_uniform_subsets() {
        let cap = expand_capacity(&[12, 10, 8, 6, 4, 3], 6, 12).unwrap();
        let rows = allocate(&cap, 12, 3, 0);
        for (r, c) in rows.iter().zip(&cap) {
            assert_eq!(r.layers.len(), *c);
            assert_eq!(r.mask.iter().map(|&m| m as usize).sum::<usize>(), *c);
        }
        assert_eq!(rows[0].layers, (0..12).collect::<Vec<_>>());
        // Same seed and round: same rows; another round: different rows.
        assert_eq!(allocate(&cap, 12, 3, 0)[5].layers, rows[5].layers);
        let differ = (0..20).any(|r| allocate(&cap, 12, r, 0)[5].layers != rows[5].layers);
        assert!(differ);
        // Each layer is about equally likely for a 3-of-12 client.
        let mut count = [0usize; 12];
        for r in 0..4000 {
            for l in &allocate(&[3], 12, r, 7)[0].layers {
                count[*l] += 1;
            }
        }
        for c in count {
            assert!((850..1150).contains(&c), "{count:?}");
        }
        assert_eq!(expand_capacity(&[4, 2], 4, 12).unwrap(), vec![4, 4, 2, 2]);
        assert!(expand_capacity(&[4, 2, 1], 4, 12).is_err());
        assert!(expand_capacity(&[13], 2, 12).is_err());
    }

    #[test]
    fn local_and_global_numbering() {
        let re = layer_regex(r"layers\.(\d+)\.").unwrap();
        let mut held = BTreeMap::new();
        held.insert("a".to_string(), vec![1, 4]);
        let alloc = Alloc {
            num_layers: 6,
            held,
        };
        let n = |v: &[&str]| v.iter().map(|s| (s.to_string(), s.to_string())).collect();
        let local = map_names(
            &re,
            &alloc,
            "a",
            "a",
            n(&["layers.0.x", "layers.1.x", "head"]),
        )
        .unwrap();
        assert_eq!(local[0].0, "layers.1.x");
        assert_eq!(local[1].0, "layers.4.x");
        assert_eq!(local[2].0, "head");
        let global = map_names(&re, &alloc, "a", "a", n(&["layers.1.x", "layers.4.x"])).unwrap();
        assert_eq!(global[1].0, "layers.4.x");
        assert!(map_names(&re, &alloc, "a", "a", n(&["layers.2.x"])).is_err());
        assert!(map_names(&re, &alloc, "b", "b", n(&["layers.0.x"])).is_err());
        assert!(layer_regex("layers").is_err());
    }
}
