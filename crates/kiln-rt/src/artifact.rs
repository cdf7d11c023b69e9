//! Compiled artifacts: one safetensors file that holds everything needed to run a model.
//!
//! - **Tensors**: every weight the graph reads, as its bytes are stored (packed formats
//!   included, with no conversion). Float formats (`f32`, `f16`, `bf16`) are stored under
//!   their safetensors dtype and logical shape, so other tools can read them; block formats
//!   (`q8_0`, `q4_0`, `q4_1`, ...) as `U8[bytes]`.
//! - **Metadata** (`__metadata__`, string to string):
//!   - `kiln.format_version`: [`FORMAT_VERSION`]; a reader refuses any other;
//!   - `kiln.ir`: the graph in IR text, whose `weight` nodes give each tensor's format,
//!     shape and checksum (checked on load);
//!   - `kiln.passes`: the pass reports, a JSON array (`[]` when no pass ran);
//!   - any other `kiln.*` entry the writer adds (the CLI stores the tokenizer and the
//!     end-of-sequence id, so that an artifact runs without its source files).
//!
//! Reading maps the file: weights are views into the mapping, not copies.

use kiln_ir::{Bytes, Format, Graph, Op, TensorData};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The artifact layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const VERSION_KEY: &str = "kiln.format_version";
const IR_KEY: &str = "kiln.ir";
pub const PASSES_KEY: &str = "kiln.passes";
/// Where artifacts written before activations were an attribute of `linear` recorded the
/// mode the quantize pass chose (`f32`, `int8`, `int8-row`). Reading one applies it to its
/// linears ([`kiln_ir::set_activations`], the rule the pass applies now) and drops the
/// entry, so an old artifact runs as it did on the JIT; artifacts carry it in their IR now.
const LEGACY_ACTIVATIONS_KEY: &str = "kiln.activations";
/// The tokenizer (a `tokenizer.json`, as the `tokenizers` crate writes it), so that text in
/// and out needs only the artifact.
pub const TOKENIZER_KEY: &str = "kiln.tokenizer";
/// The end-of-sequence token id of a language model, when its checkpoint names one.
pub const EOS_KEY: &str = "kiln.eos_token_id";
/// Where the model came from (`SPEC + CHECKPOINT` file names).
pub const SOURCE_KEY: &str = "kiln.source";
/// In a native program's artifact: the graph generation runs (logits at the last position
/// only), for language models.
pub const GENERATE_IR_KEY: &str = "kiln.native.generate_ir";
/// In a native program's artifact: the target CPU its kernels were compiled for.
pub const TARGET_KEY: &str = "kiln.native.target";

/// A model read from an artifact: the graph, bound to the artifact's tensors, and the
/// metadata entries.
pub struct Artifact {
    pub graph: Graph,
    pub metadata: BTreeMap<String, String>,
}

impl Artifact {
    /// The pass reports (a JSON array).
    pub fn passes(&self) -> &str {
        self.metadata.get(PASSES_KEY).map_or("[]", String::as_str)
    }

    /// Another graph over this artifact's weights: the IR text stored under metadata key
    /// `key` (a native executable stores the graph that generation runs), parsed, verified
    /// and bound to the tensors of the same names, which must have the formats and shapes
    /// its weight nodes give.
    pub fn graph_at(&self, key: &str) -> Result<Graph, ArtifactError> {
        let damaged = |message: String| ArtifactError::Damaged { path: format!("the artifact's `{key}`"), message };
        let ir = self.metadata.get(key).ok_or_else(|| damaged("no such metadata entry".into()))?;
        let mut graph = kiln_ir::parse(ir).map_err(|e| damaged(format!("its IR does not parse: {e}")))?;
        kiln_ir::verify(&graph).map_err(|e| damaged(format!("its IR does not verify: {e}")))?;
        let mut bound = Vec::new();
        for n in graph.node_ids() {
            let node = graph.node(n);
            let Op::Weight(w) = &node.op else { continue };
            let shape: Vec<u64> = node.ty.shape.iter().map(|d| d.known().unwrap_or(0)).collect();
            for p in w.parts(&shape) {
                let data =
                    self.graph.store.get(p.tensor).ok_or_else(|| damaged(format!("no tensor `{}`", p.tensor)))?;
                if data.format != p.format || data.shape != p.shape {
                    return Err(damaged(format!("tensor `{}` is not {} {:?}", p.tensor, p.format, p.shape)));
                }
                bound.push((p.tensor.to_string(), data.clone()));
            }
        }
        for (name, data) in bound {
            graph.store.insert(name, data);
        }
        Ok(graph)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kiln artifact: {message}")]
    NotAnArtifact { path: String, message: String },
    #[error("{path} is a kiln artifact of format version {found}; this kiln reads version {FORMAT_VERSION}")]
    Version { path: String, found: String },
    #[error("{path} is damaged: {message}")]
    Damaged { path: String, message: String },
    #[error("cannot write the artifact: {0}")]
    Write(String),
}

/// Whether the file at `path` looks like a safetensors file (an artifact, not a spec):
/// an 8-byte little-endian header length followed by `{`.
pub fn looks_like_artifact(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    f.read_exact(&mut head).is_ok() && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap()) > 1
}

/// Writes `graph` (which must be bound: every weight in its store) and `extra` metadata
/// (keys should start with `kiln.`) to `path`.
pub fn write(path: &Path, graph: &Graph, extra: &BTreeMap<String, String>) -> Result<(), ArtifactError> {
    let (tensors, metadata) = contents(graph, extra)?;
    // Write beside the target and rename, so a failed write never leaves half a file.
    let tmp = path.with_extension("kiln.partial");
    let io = |e: std::io::Error| ArtifactError::Write(format!("{}: {e}", tmp.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    serialize(&tensors, &metadata, &mut out).map_err(io)?;
    std::io::Write::flush(&mut out).map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(|e| ArtifactError::Write(format!("{}: {e}", path.display())))
}

/// The bytes [`write`] writes.
pub fn to_bytes(graph: &Graph, extra: &BTreeMap<String, String>) -> Result<Vec<u8>, ArtifactError> {
    let (tensors, metadata) = contents(graph, extra)?;
    let mut out = Vec::new();
    serialize(&tensors, &metadata, &mut out).map_err(|e| ArtifactError::Write(e.to_string()))?;
    Ok(out)
}

/// An artifact's tensors by name and its metadata.
type Contents<'g> = (BTreeMap<&'g str, &'g TensorData>, BTreeMap<String, String>);

fn contents<'g>(graph: &'g Graph, extra: &BTreeMap<String, String>) -> Result<Contents<'g>, ArtifactError> {
    let mut tensors: BTreeMap<&str, &TensorData> = BTreeMap::new();
    for n in graph.node_ids() {
        if let Op::Weight(w) = &graph.node(n).op {
            for name in w.tensors() {
                let data = graph
                    .store
                    .get(name)
                    .ok_or_else(|| ArtifactError::Write(format!("weight `{name}` is not bound to data")))?;
                tensors.insert(name, data);
            }
        }
    }
    let mut metadata: BTreeMap<String, String> = extra.clone();
    metadata.insert(VERSION_KEY.into(), FORMAT_VERSION.to_string());
    metadata.insert(IR_KEY.into(), kiln_ir::print(graph));
    metadata.entry(PASSES_KEY.into()).or_insert_with(|| "[]".into());
    Ok((tensors, metadata))
}

/// Writes a safetensors file whose bytes depend only on its contents: the header's keys
/// sorted (`safetensors::serialize` takes the metadata as a `HashMap` and writes it in
/// hash order, so the same artifact came out with different bytes), the data of wider
/// types first so that every tensor starts aligned to its element size (as `safetensors`
/// lays it out), then by name.
fn serialize(
    tensors: &BTreeMap<&str, &TensorData>,
    metadata: &BTreeMap<String, String>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let layout = |data: &TensorData| match data.format {
        Format::F32 => ("F32", 4),
        Format::F16 => ("F16", 2),
        Format::BF16 => ("BF16", 2),
        _ => ("U8", 1),
    };
    let mut order: Vec<(&str, &TensorData)> = tensors.iter().map(|(n, d)| (*n, *d)).collect();
    order.sort_by_key(|(name, data)| (std::cmp::Reverse(layout(data).1), *name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(std::io::Error::other)?);
    let mut offset = 0usize;
    for (name, data) in &order {
        let shape: Vec<u64> = match data.format {
            Format::F32 | Format::F16 | Format::BF16 => data.shape.clone(),
            _ => vec![data.bytes.len() as u64],
        };
        let end = offset + data.bytes.len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": layout(data).0, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    // In key order (serde_json's map sorts, or with `preserve_order` keeps the order above:
    // deterministic either way); the data starts 8-byte aligned.
    let mut json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for (_, data) in &order {
        out.write_all(data.bytes.as_slice())?;
    }
    Ok(())
}

/// Reads an artifact: maps the file, parses and verifies its IR, and binds every weight to
/// its bytes after checking format, size and checksum.
pub fn read(path: &Path) -> Result<Artifact, ArtifactError> {
    open(path, true)
}

/// [`read`], checking the tensors' checksums or not (see [`read_bytes`]).
pub fn open(path: &Path, checksums: bool) -> Result<Artifact, ArtifactError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ArtifactError::Io { path: p.clone(), source })?;
    // SAFETY: the mapping is read-only; like every mmap-based reader we rely on the file not
    // being truncated while it is in use.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ArtifactError::Io { path: p.clone(), source })?;
    read_bytes(Bytes::new(Arc::new(map)), &p, checksums)
}

/// The bytes of an artifact file's header (its 8-byte length and the JSON: the IR with every
/// tensor's checksum and place, and the metadata), which identify its contents.
pub fn header_of(bytes: &[u8]) -> Option<&[u8]> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    bytes.get(..8usize.checked_add(usize::try_from(len).ok()?)?)
}

/// Reads an artifact held in memory, as [`read`] does a file (`name` names it in errors).
/// With `checksums` false, tensors are not checked against the checksums in the IR: an
/// artifact embedded in a native executable is part of the executable's own bytes, and
/// hashing them would take most of its start-up.
pub fn read_bytes(whole: Bytes, name: &str, checksums: bool) -> Result<Artifact, ArtifactError> {
    let p = name.to_string();
    let map = whole.as_slice();
    let not_artifact = |message: String| ArtifactError::NotAnArtifact { path: p.clone(), message };
    let damaged = |message: String| ArtifactError::Damaged { path: p.clone(), message };
    let (header_len, header) =
        SafeTensors::read_metadata(map).map_err(|e| not_artifact(format!("not a safetensors file ({e})")))?;
    let metadata: BTreeMap<String, String> =
        header.metadata().clone().unwrap_or_default().into_iter().collect::<BTreeMap<_, _>>();
    match metadata.get(VERSION_KEY) {
        None => return Err(not_artifact(format!("no `{VERSION_KEY}` in its metadata"))),
        Some(v) if *v != FORMAT_VERSION.to_string() => {
            return Err(ArtifactError::Version { path: p.clone(), found: v.clone() });
        }
        Some(_) => {}
    }
    let mut metadata = metadata;
    let ir = metadata.get(IR_KEY).ok_or_else(|| damaged(format!("no `{IR_KEY}` in its metadata")))?;
    let mut graph = kiln_ir::parse(ir).map_err(|e| damaged(format!("its IR does not parse: {e}")))?;
    kiln_ir::verify(&graph).map_err(|e| damaged(format!("its IR does not verify: {e}")))?;
    // An older artifact: its quantize pass's choice of activations, kept beside the IR, was
    // what `kiln run` gave the JIT by default. Applied to the linears by the rule the pass
    // applies now, it runs as it did (and as the interpreter's default too); an unknown
    // name is damage, not something to guess at.
    if let Some(mode) = metadata.remove(LEGACY_ACTIVATIONS_KEY) {
        let mode: kiln_ir::Activations =
            mode.parse().map_err(|e| damaged(format!("its `{LEGACY_ACTIVATIONS_KEY}`: {e}")))?;
        kiln_ir::set_activations(&mut graph, mode);
    }

    let infos = header.tensors();
    let data_start = 8 + header_len;
    // Every store tensor of every weight (a sparse weight's values and mask), as its IR says.
    let mut weights: Vec<(String, Format, Option<u64>, Vec<u64>)> = Vec::new();
    for n in graph.node_ids() {
        let Op::Weight(w) = &graph.node(n).op else { continue };
        let shape: Vec<u64> = graph.node(n).ty.shape.iter().map(|d| d.known().unwrap_or(0)).collect();
        for p in w.parts(&shape) {
            weights.push((p.tensor.to_string(), p.format, p.checksum, p.shape));
        }
    }
    for (name, format, checksum, shape) in weights {
        if graph.store.get(&name).is_some() {
            continue; // a tied weight read by several nodes
        }
        let info = infos.get(&name).ok_or_else(|| damaged(format!("tensor `{name}` is missing")))?;
        let (start, end) = info.data_offsets;
        let bytes = whole
            .slice(data_start + start..data_start + end)
            .ok_or_else(|| damaged(format!("tensor `{name}` lies outside the file")))?;
        let data = TensorData::new(format, shape, bytes).map_err(|e| damaged(format!("tensor `{name}`: {e}")))?;
        if let Some(want) = checksum
            && checksums
            && data.checksum() != want
        {
            return Err(damaged(format!("tensor `{name}` does not match the checksum in its IR")));
        }
        graph.store.insert(name, data);
    }
    Ok(Artifact { graph, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Dim, Type, WeightRef};

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-artifact-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("model.kiln")
    }

    /// A graph reading one weight of `format` (with the given stored bytes) as `[2, 32]`.
    fn graph_with(format: Format, bytes: Vec<u8>) -> Graph {
        let mut g = Graph::new("t");
        let data = TensorData::new(format, vec![2, 32], Bytes::from_vec(bytes)).unwrap();
        let w = WeightRef::dense("w", format, Some(data.checksum()));
        g.store.insert("w", data);
        let ty = Type::f32([Dim::Known(2), Dim::Known(32)]);
        let n = g.add_typed(Op::Weight(w), &[], ty, "", None);
        g.set_output("y", n).unwrap();
        g
    }

    /// Every format's bytes come back as stored, with the IR and extra metadata.
    #[test]
    fn round_trips_every_format_as_stored() {
        for format in Format::ALL {
            let len = format.byte_len(64).unwrap() as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            if matches!(format, Format::F16 | Format::Q8_0 | Format::Q4_0 | Format::Q4_1) {
                // keep f16 scales finite: clear the exponent's top bit of every odd byte
                bytes.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3f);
            }
            let g = graph_with(format, bytes.clone());
            let path = temp(&format.name());
            let extra = BTreeMap::from([("kiln.note".to_string(), "hello".to_string())]);
            write(&path, &g, &extra).unwrap();
            let a = read(&path).unwrap();
            assert_eq!(a.graph.store.get("w").unwrap().bytes.as_slice(), &bytes[..], "{format}");
            assert_eq!(kiln_ir::print(&a.graph), kiln_ir::print(&g));
            assert_eq!(a.metadata["kiln.note"], "hello");
            assert_eq!(a.passes(), "[]");
            assert!(looks_like_artifact(&path));
        }
    }

    /// A sparse weight's values and mask are both written and both bound on reading, with
    /// their checksums checked; a damaged mask is refused.
    #[test]
    fn round_trips_sparse_weights() {
        let text =
            "graph t {\n  %0 = weight \"w\" int4g32 sparse 2:4 \"w.mask\" : f32[2, 64]\n  output \"y\" = %0\n}\n";
        let mut g = kiln_ir::parse(text).unwrap();
        let dense: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 64.0).collect();
        let keep: Vec<bool> = (0..128).map(|i| i % 4 == 1 || i % 4 == 2).collect();
        let (values, mask) = kiln_ir::sparse::pack(2, 4, 2, 64, &dense, &keep).unwrap();
        let int4 = kiln_ir::IntFormat::new(4, 32, false).unwrap();
        let values = TensorData::new(Format::Int(int4), vec![2, 32], Bytes::from_vec(int4.quantize(&values))).unwrap();
        let mask = TensorData::new(Format::U8, vec![2, 8], Bytes::from_vec(mask)).unwrap();
        let sums = (values.checksum(), mask.checksum());
        g.store.insert("w", values);
        g.store.insert("w.mask", mask);
        let id = g.topo_order().unwrap()[0];
        if let Op::Weight(w) = &mut g.node_mut(id).op {
            w.checksum = Some(sums.0);
            w.sparse.as_mut().unwrap().mask_checksum = Some(sums.1);
        }
        kiln_ir::verify(&g).unwrap();
        let path = temp("sparse");
        write(&path, &g, &BTreeMap::new()).unwrap();
        let a = read(&path).unwrap();
        assert_eq!(kiln_ir::print(&a.graph), kiln_ir::print(&g));
        let Op::Weight(w) = &a.graph.node(a.graph.topo_order().unwrap()[0]).op else { panic!() };
        let Op::Weight(orig) = &g.node(id).op else { panic!() };
        assert_eq!(w.value(&a.graph.store, &[2, 64]).unwrap(), orig.value(&g.store, &[2, 64]).unwrap());
        // Two rows of 32 int4 values (one 18-byte block each), and two 8-byte mask rows.
        assert_eq!(w.stored_bytes(&a.graph.store), 2 * 18 + 2 * 8);

        // Flip one bit of the mask (its bytes are the file's last: the smallest alignment).
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(&path).err().expect("a damaged mask is refused").to_string();
        assert!(err.contains("tensor `w.mask` does not match the checksum"), "{err}");
    }

    /// The bytes depend on the contents only: the same graph and metadata written twice (the
    /// metadata built in different orders) give the same file, the header's keys sorted,
    /// and every tensor starts aligned to its element size; `safetensors` reads it.
    #[test]
    fn writes_the_same_bytes_every_time() {
        let mut g = graph_with(Format::Q8_0, vec![0; Format::Q8_0.byte_len(64).unwrap() as usize]);
        let x = g.add_typed(
            Op::Weight(WeightRef::dense("a_f32", Format::F32, None)),
            &[],
            Type::f32([Dim::Known(3)]),
            "",
            None,
        );
        g.store.insert("a_f32", TensorData::from_f32(vec![3], &[1.0, 2.0, 3.0]));
        g.set_output("x", x).unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("kiln.k{i:02}")).collect();
        let files: Vec<Vec<u8>> = [false, true]
            .iter()
            .map(|&reverse| {
                let mut extra = BTreeMap::new();
                let mut order = keys.clone();
                if reverse {
                    order.reverse();
                }
                for k in order {
                    extra.insert(k.clone(), format!("value of {k}"));
                }
                let path = temp(if reverse { "det-b" } else { "det-a" });
                write(&path, &g, &extra).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert_eq!(files[0], files[1]);
        let st = SafeTensors::deserialize(&files[0]).unwrap();
        let header_len = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header = std::str::from_utf8(&files[0][8..8 + header_len]).unwrap();
        let at = |k: &str| header.find(&format!("\"{k}\"")).unwrap();
        assert!(keys.windows(2).all(|w| at(&w[0]) < at(&w[1])), "{header}");
        // The f32 tensor first (aligned), then the bytes of the Q8_0 one.
        let (_, f32_info) = SafeTensors::read_metadata(&files[0]).unwrap();
        assert_eq!(f32_info.tensors()["a_f32"].data_offsets.0, 0);
        assert_eq!(
            st.tensor("a_f32").unwrap().data(),
            [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
        );
        assert!(read(&temp("det-a")).is_ok());
    }

    /// An artifact written before activations were an attribute of `linear` recorded them
    /// in `kiln.activations`: reading it applies them to the linears by the rule, and the
    /// entry is gone; an unknown mode there is damage.
    #[test]
    fn older_artifacts_recorded_activations_become_the_linears_attributes() {
        let mut g = graph_with(Format::Q8_0, vec![0; Format::Q8_0.byte_len(64).unwrap() as usize]);
        let w = g.outputs()[0].1;
        let x = g.add_typed(Op::Input { name: "x".into() }, &[], Type::f32([Dim::Known(1), Dim::Known(32)]), "", None);
        let y = g.add(Op::Linear { activations: kiln_ir::Activations::F32 }, &[x, w], "", None).unwrap();
        g.set_output("z", y).unwrap();
        let activations = |a: &Artifact| match a.graph.node(a.graph.outputs()[1].1).op {
            Op::Linear { activations } => activations,
            ref op => panic!("{op:?}"),
        };
        let path = temp("legacy-activations");
        for (recorded, want) in [
            ("int8", kiln_ir::Activations::Int8),
            // By the rule: per-row scales are for int8gK weights, q8_0 takes blocks.
            ("int8-row", kiln_ir::Activations::Int8),
            ("f32", kiln_ir::Activations::F32),
        ] {
            write(&path, &g, &BTreeMap::from([(LEGACY_ACTIVATIONS_KEY.to_string(), recorded.to_string())])).unwrap();
            let a = read(&path).unwrap();
            assert_eq!(activations(&a), want, "{recorded}");
            assert!(!a.metadata.contains_key(LEGACY_ACTIVATIONS_KEY));
            kiln_ir::verify(&a.graph).unwrap();
        }
        write(&path, &g, &BTreeMap::new()).unwrap();
        assert_eq!(activations(&read(&path).unwrap()), kiln_ir::Activations::F32);
        write(&path, &g, &BTreeMap::from([(LEGACY_ACTIVATIONS_KEY.to_string(), "int4".to_string())])).unwrap();
        let err = read(&path).err().unwrap().to_string();
        assert!(err.contains("is damaged") && err.contains("unknown activations `int4`"), "{err}");
    }

    #[test]
    fn refuses_other_versions_and_damage() {
        let g = graph_with(Format::F32, vec![0; 256]);
        let path = temp("version");
        write(&path, &g, &BTreeMap::from([(VERSION_KEY.to_string(), "0".to_string())])).unwrap();
        // `write` always records its own version.
        assert!(read(&path).is_ok());
        let mut bytes = std::fs::read(&path).unwrap();
        let key = b"\"kiln.format_version\":\"1\"";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() - 2;
        bytes[at] = b'7';
        std::fs::write(&path, &bytes).unwrap();
        let err = read(&path).err().unwrap();
        assert!(err.to_string().contains("format version 7"), "{err}");
        bytes[at] = b'1';
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(&path).err().unwrap();
        assert!(err.to_string().contains("does not match the checksum"), "{err}");
    }
}
