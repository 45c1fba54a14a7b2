//! Reading the manifest, opening every input once (memory-mapped), and
//! checking that the tensors line up before any value is read: the output
//! specs list, for each output tensor, the client (or partial) tensors that
//! feed it.

use crate::cpu;
use crate::fedra::Alloc;
use ftk::io::Input;
use ftk::jsonl::{KindOnly, Reader};
use ftk::records::{ClientUpdate, Record};
use ftk::tensors::{Dtype, Tensor, TensorFile};
use ftk::{Error, Result};
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A failure while aggregating: one client's fault (skippable with
/// `--skip-bad`) or a fatal error.
#[derive(Debug)]
pub enum Fault {
    Client(usize, String),
    Fatal(Error),
}

impl From<Error> for Fault {
    fn from(e: Error) -> Self {
        Fault::Fatal(e)
    }
}

impl Fault {
    pub fn into_error(self) -> Error {
        match self {
            Fault::Client(_, m) => Error::input(format!(
                "{m}; fix or drop that client (--skip-bad drops bad clients and lists them)"
            )),
            Fault::Fatal(e) => e,
        }
    }
}

/// One `client_update` line.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    pub cid: String,
    pub path: PathBuf,
    /// Example count (or any non-negative weight: Flower's message API
    /// weights by a float metric).
    pub num_examples: f64,
}

/// Read `client_update` records; other kinds are skipped. Relative paths are
/// resolved against the manifest's directory (the working directory for stdin).
pub fn read_manifest(path: &Path) -> Result<Vec<ClientEntry>> {
    let input = Input::open(path)?;
    let base = if path == Path::new("-") {
        PathBuf::from(".")
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let mut r = Reader::new(input.name.clone(), input.reader);
    let mut out: Vec<ClientEntry> = Vec::new();
    let mut seen = BTreeSet::new();
    while let Some(line) = r.next_line()? {
        // Unlike records::next, a record without a kind is refused: a
        // manifest of bare {"cid",...} lines would otherwise read as empty.
        match serde_json::from_str::<KindOnly>(line)
            .map_err(|e| r.decode_error(&e))?
            .kind
            .as_deref()
        {
            Some(k) if k == ClientUpdate::KIND => {}
            Some(_) => continue,
            None => {
                return Err(Error::input(format!(
                    "{}: record has no \"kind\"; expected {{\"kind\":\"client_update\",\"cid\",\"path\",\"num_examples\"}}",
                    r.here()
                )))
            }
        }
        let ClientUpdate {
            cid,
            path: p,
            num_examples,
            ..
        } = serde_json::from_str(r.current_line()).map_err(|e| r.decode_error(&e))?;
        if !seen.insert(cid.clone()) {
            return Err(Error::input(format!(
                "{}: client '{cid}' appears twice; each cid must be unique",
                r.here()
            )));
        }
        let p = PathBuf::from(p);
        let path = if p.is_absolute() { p } else { base.join(p) };
        out.push(ClientEntry {
            cid,
            path,
            num_examples,
        });
    }
    if out.is_empty() {
        return Err(Error::input(format!(
            "{}: no client_update records; nothing to aggregate",
            r.source()
        )));
    }
    Ok(out)
}

/// What a partial-aggregate file says about itself.
#[derive(Debug, Clone)]
pub struct PartialMeta {
    pub strategy: String,
    pub weighting: String,
    pub clients: u64,
    pub weights: HashMap<String, f64>,
    pub dtypes: HashMap<String, Dtype>,
    pub clip_norm: Option<f64>,
    /// The clients summed into it (absent in partials from older ftk).
    pub cids: Option<Vec<String>>,
}

/// An opened input: a client file or a partial aggregate.
pub struct Origin {
    pub cid: String,
    pub label: String,
    pub file: Mapped,
    /// num_examples (1 for uniform weighting).
    pub weight: f64,
    pub partial: Option<PartialMeta>,
}

impl Origin {
    pub fn open_client(e: &ClientEntry, uniform: bool) -> Result<Origin> {
        let label = format!("client '{}' ({})", e.cid, e.path.display());
        let file = Mapped::open(&e.path).map_err(|err| match err {
            Error::Input(m) => Error::input(format!("client '{}': {m}", e.cid)),
            other => Error::input(format!("client '{}': {other}", e.cid)),
        })?;
        Ok(Origin {
            cid: e.cid.clone(),
            label,
            file,
            weight: if uniform { 1.0 } else { e.num_examples },
            partial: None,
        })
    }

    pub fn open_partial(path: &Path) -> Result<Origin> {
        let file = Mapped::open(path)?;
        let name = path.display().to_string();
        let meta = file.metadata().cloned().unwrap_or_default();
        if meta.get("ftk_partial").map(String::as_str) != Some("1") {
            return Err(Error::input(format!(
                "{name}: not a fed-aggregate partial (no ftk_partial metadata); write partials with --partial-out"
            )));
        }
        let get = |k: &str| {
            meta.get(k).cloned().ok_or_else(|| {
                Error::input(format!(
                    "{name}: partial metadata lacks \"{k}\" (corrupt partial?)"
                ))
            })
        };
        let weights: HashMap<String, f64> = serde_json::from_str(&get("weights")?)
            .map_err(|e| Error::input(format!("{name}: bad \"weights\" metadata: {e}")))?;
        let dtypes: HashMap<String, Dtype> = serde_json::from_str(&get("dtypes")?)
            .map_err(|e| Error::input(format!("{name}: bad \"dtypes\" metadata: {e}")))?;
        let clients: u64 = get("clients")?
            .parse()
            .map_err(|e| Error::input(format!("{name}: bad \"clients\" metadata: {e}")))?;
        let clip_norm =
            match meta.get("clip_norm") {
                Some(s) => Some(s.parse::<f64>().map_err(|e| {
                    Error::input(format!("{name}: bad \"clip_norm\" metadata: {e}"))
                })?),
                None => None,
            };
        let cids = match meta.get("cids") {
            Some(s) => Some(
                serde_json::from_str::<Vec<String>>(s)
                    .map_err(|e| Error::input(format!("{name}: bad \"cids\" metadata: {e}")))?,
            ),
            None => None,
        };
        Ok(Origin {
            cid: name.clone(),
            label: format!("partial {name}"),
            file,
            weight: 1.0,
            partial: Some(PartialMeta {
                strategy: get("strategy")?,
                weighting: get("weighting")?,
                clients,
                weights,
                dtypes,
                clip_norm,
                cids,
            }),
        })
    }
}

/// One input tensor feeding an output tensor.
pub struct Src<'a> {
    pub origin: usize,
    pub t: Tensor<'a>,
    /// Client weight, or the partial's accumulated weight for this tensor.
    pub weight: f64,
    /// True for a partial's weighted sum (added as is, never clipped).
    pub summed: bool,
}

/// One output tensor.
pub struct Spec<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub sources: Vec<Src<'a>>,
    pub global: Option<Tensor<'a>>,
}

impl Spec<'_> {
    /// The summed weight of every source (what a partial records and what a
    /// plain weighted mean divides by).
    pub fn total_weight(&self) -> f64 {
        self.sources.iter().map(|x| x.weight).sum()
    }
}

/// How to line up the inputs.
pub struct Layout<'r> {
    pub keep_local: Option<&'r Regex>,
    /// FedRA: layer regex and allocation (clients may hold different layers).
    pub fedra: Option<(&'r Regex, &'r Alloc)>,
    /// Every output tensor needs a global value.
    pub need_global: bool,
    /// Tensors of the global no input holds are copied to the output.
    pub fill_from_global: bool,
}

fn describe_shape(d: Dtype, s: &[usize]) -> String {
    format!("{d:?} {s:?}")
}

/// Build the output specs over the `active` origins.
pub fn build<'a>(
    origins: &'a [Origin],
    active: &[usize],
    global: Option<(&'a Mapped, &str)>,
    lay: &Layout<'_>,
) -> std::result::Result<Vec<Spec<'a>>, Fault> {
    // Per origin: (output name, file name) pairs.
    let mut by_name: BTreeMap<String, Vec<Src<'a>>> = BTreeMap::new();
    let mut first_names: Option<(usize, BTreeSet<String>)> = None;
    let same_set = lay.fedra.is_none() && origins.iter().all(|o| o.partial.is_none());
    for &i in active {
        let o = &origins[i];
        let mut names: Vec<(String, String)> = Vec::new();
        for n in o.file.names() {
            if lay.keep_local.is_some_and(|r| r.is_match(n)) {
                continue;
            }
            names.push((n.clone(), n.clone()));
        }
        if let Some((re, alloc)) = lay.fedra {
            if o.partial.is_none() {
                names = crate::fedra::map_names(re, alloc, &o.cid, &o.label, names)
                    .map_err(|m| Fault::Client(i, m.to_string()))?;
                names.retain(|(out, _)| !lay.keep_local.is_some_and(|r| r.is_match(out)));
            }
        }
        if same_set {
            let set: BTreeSet<String> = names.iter().map(|p| p.0.clone()).collect();
            match &first_names {
                None => first_names = Some((i, set)),
                Some((j, refset)) => {
                    if let Some(n) = refset.difference(&set).next() {
                        return Err(Fault::Client(
                            i,
                            format!(
                                "{}: no tensor '{n}' ({} has it); every client must send the same tensors",
                                o.label, origins[*j].label
                            ),
                        ));
                    }
                    if let Some(n) = set.difference(refset).next() {
                        return Err(Fault::Client(
                            i,
                            format!(
                                "{}: extra tensor '{n}' ({} lacks it); every client must send the same tensors",
                                o.label, origins[*j].label
                            ),
                        ));
                    }
                }
            }
        }
        for (out, file_name) in names {
            // The name lives in the TensorFile's header; borrow it from there.
            let t = o
                .file
                .tensor(&file_name)
                .expect("name listed by the file itself");
            let (weight, summed) = match &o.partial {
                Some(p) => (
                    *p.weights.get(&out).ok_or_else(|| {
                        Fault::Fatal(Error::input(format!(
                            "{}: no weight recorded for tensor '{out}' (corrupt partial?)",
                            o.label
                        )))
                    })?,
                    true,
                ),
                None => (o.weight, false),
            };
            by_name.entry(out).or_default().push(Src {
                origin: i,
                t,
                weight,
                summed,
            });
        }
    }
    let mut specs = Vec::with_capacity(by_name.len());
    for (name, sources) in by_name {
        let first = &sources[0];
        let o0 = &origins[first.origin];
        let dtype = match &o0.partial {
            Some(p) => *p.dtypes.get(&name).ok_or_else(|| {
                Fault::Fatal(Error::input(format!(
                    "{}: no dtype recorded for tensor '{name}' (corrupt partial?)",
                    o0.label
                )))
            })?,
            None => first.t.dtype,
        };
        for s in &sources {
            let o = &origins[s.origin];
            let fault = |m: String| {
                if o.partial.is_some() {
                    Fault::Fatal(Error::input(m))
                } else {
                    Fault::Client(s.origin, m)
                }
            };
            let want = if o.partial.is_some() {
                Dtype::F64
            } else {
                dtype
            };
            if !cpu::supported(s.t.dtype) {
                return Err(fault(format!(
                    "{}: tensor '{}' has dtype {:?}; fed-aggregate reads float and integer tensors only (use --keep-local to leave it out)",
                    o.label, s.t.name, s.t.dtype
                )));
            }
            if s.t.dtype != want || s.t.shape != first.t.shape {
                return Err(fault(format!(
                    "{}: tensor '{}' is {}, but {} sends {}; every client must send the same shapes and dtypes",
                    o.label,
                    s.t.name,
                    describe_shape(s.t.dtype, s.t.shape),
                    o0.label,
                    describe_shape(first.t.dtype, first.t.shape)
                )));
            }
            if let Some(p) = &o.partial {
                if p.dtypes.get(&name) != Some(&dtype) {
                    return Err(fault(format!(
                        "{}: tensor '{name}' was {:?} in the clients, but {} says {:?}",
                        o.label,
                        p.dtypes.get(&name),
                        o0.label,
                        dtype
                    )));
                }
            }
        }
        specs.push(Spec {
            numel: first.t.numel(),
            shape: first.t.shape.to_vec(),
            name,
            dtype,
            sources,
            global: None,
        });
    }
    if let Some((g, gname)) = global {
        for s in &mut specs {
            match g.tensor(&s.name) {
                Some(t) => {
                    if t.shape != s.shape.as_slice() || !cpu::supported(t.dtype) {
                        return Err(Fault::Fatal(Error::input(format!(
                            "global {gname}: tensor '{}' is {}, but the clients send {}",
                            s.name,
                            describe_shape(t.dtype, t.shape),
                            describe_shape(s.dtype, &s.shape)
                        ))));
                    }
                    if cpu::is_int(t.dtype) != cpu::is_int(s.dtype) {
                        return Err(Fault::Fatal(Error::input(format!(
                            "global {gname}: tensor '{}' is {:?}, but the clients send {:?}",
                            s.name, t.dtype, s.dtype
                        ))));
                    }
                    s.global = Some(t);
                }
                None if lay.need_global => {
                    return Err(Fault::Fatal(Error::input(format!(
                        "global {gname}: no tensor '{}', which the clients send; give the current global model",
                        s.name
                    ))))
                }
                None => {}
            }
        }
        if lay.fill_from_global {
            let have: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
            for n in g.names() {
                if have.contains(n) || lay.keep_local.is_some_and(|r| r.is_match(n)) {
                    continue;
                }
                let t = g.tensor(n).expect("listed by the file");
                if !cpu::supported(t.dtype) {
                    return Err(Fault::Fatal(Error::input(format!(
                        "global {gname}: tensor '{n}' has unsupported dtype {:?}",
                        t.dtype
                    ))));
                }
                specs.push(Spec {
                    name: n.clone(),
                    dtype: t.dtype,
                    shape: t.shape.to_vec(),
                    numel: t.numel(),
                    sources: Vec::new(),
                    global: Some(t),
                });
            }
            specs.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
    Ok(specs)
}

/// A memory-mapped safetensors file with its tensor names owned alongside,
/// so tensors can be borrowed for the file's whole lifetime.
pub struct Mapped {
    pub file: TensorFile,
    /// Sorted.
    names: Vec<String>,
    /// Address range of the tensor data inside the file's memory map.
    span: (usize, usize),
}

impl Mapped {
    pub fn new(file: TensorFile) -> Mapped {
        let mut names = file.names();
        names.sort();
        let mut span = (usize::MAX, 0);
        for n in &names {
            if let Some(t) = file.get(n) {
                let p = t.data.as_ptr() as usize;
                span = (span.0.min(p), span.1.max(p + t.data.len()));
            }
        }
        if span.0 > span.1 {
            span = (0, 0);
        }
        Mapped { file, names, span }
    }

    pub fn open(path: &Path) -> Result<Mapped> {
        Ok(Mapped::new(TensorFile::open(path)?))
    }

    /// Address range of all tensor data (for [`crate::cpu::release`]).
    pub fn span(&self) -> (usize, usize) {
        self.span
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        let i = self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()?;
        self.file.get(&self.names[i])
    }

    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.file.metadata()
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }
}
