//! The safetensors reader.
//!
//! Layout: a little-endian `u64` header length `n`, `n` bytes of JSON mapping tensor names
//! to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the
//! header) plus an optional `__metadata__` object of strings, then the tensor data.
//!
//! The `safetensors` crate is the authority on validity. Its errors do not say which
//! tensor is at fault, though, so the header is first checked here for the common
//! problems (truncation, unknown dtypes, shapes that disagree with byte lengths) to give
//! precise messages.

use super::{Checkpoint, CheckpointError, CheckpointKind, MetaValue};
use kiln_ir::{Bytes, Format, TensorData, TensorStore};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, SafeTensorError, TensorInfo};
use std::path::Path;

/// The safetensors dtypes kiln loads as weights.
pub(super) const SUPPORTED: &[&str] = &["F32", "F16", "BF16"];

/// The `safetensors` crate refuses headers larger than this.
const MAX_HEADER_LEN: u64 = 100_000_000;

fn format_of(dtype: Dtype) -> Option<Format> {
    match dtype {
        Dtype::F32 => Some(Format::F32),
        Dtype::F16 => Some(Format::F16),
        Dtype::BF16 => Some(Format::BF16),
        _ => None,
    }
}

/// Reads a safetensors file whose contents are `data`.
pub(super) fn read(path: &Path, data: Bytes) -> Result<Checkpoint, CheckpointError> {
    let file = data.as_slice();
    let corrupt = |reason: String| CheckpointError::CorruptHeader {
        path: path.to_path_buf(),
        kind: CheckpointKind::Safetensors,
        reason,
    };
    let data_start = precheck(path, file)?;

    let (_, header) = SafeTensors::read_metadata(file).map_err(|e| corrupt(explain(e, file, data_start)))?;

    let mut tensors = TensorStore::new();
    let mut skipped = Vec::new();
    for (name, info) in header.tensors() {
        let Some(format) = format_of(info.dtype) else {
            skipped.push((name, info.dtype.to_string()));
            continue;
        };
        let (begin, end) = info.data_offsets;
        let range = data_start.checked_add(begin).zip(data_start.checked_add(end)).map(|(b, e)| b..e);
        let bytes = range
            .and_then(|r| data.slice(r))
            .ok_or_else(|| corrupt(format!("tensor `{name}` has data_offsets [{begin}, {end}] outside the file")))?;
        let shape = info.shape.iter().map(|&d| d as u64).collect();
        let tensor = TensorData::new(format, shape, bytes).map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor);
    }
    skipped.sort();

    let metadata = header.metadata().iter().flatten().map(|(k, v)| (k.clone(), MetaValue::Str(v.clone()))).collect();

    Ok(Checkpoint { path: path.to_path_buf(), kind: CheckpointKind::Safetensors, tensors, metadata, skipped })
}

/// Checks the header for problems that deserve a precise message, returning the offset of
/// the data section. Structural problems it does not look for are left to the
/// `safetensors` crate.
fn precheck(path: &Path, file: &[u8]) -> Result<usize, CheckpointError> {
    let file_size = file.len() as u64;
    let corrupt = |reason: String| CheckpointError::CorruptHeader {
        path: path.to_path_buf(),
        kind: CheckpointKind::Safetensors,
        reason,
    };
    let truncated = |what: String, start: u64, end: u64| CheckpointError::Truncated {
        path: path.to_path_buf(),
        what,
        start,
        end,
        file_size,
    };

    let Some(len_bytes) = file.first_chunk::<8>() else {
        return Err(truncated("the header length".into(), 0, 8));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(format!("the header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes")));
    }
    let header_end = 8 + header_len; // cannot overflow: bounded above
    let header = usize::try_from(header_end)
        .ok()
        .and_then(|end| file.get(8..end))
        .ok_or_else(|| truncated("the JSON header".into(), 8, header_end))?;
    let header = std::str::from_utf8(header).map_err(|e| corrupt(format!("the JSON header is not UTF-8: {e}")))?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| corrupt(format!("the header is not a valid JSON object: {e}")))?;

    let mut infos = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            if !value.as_object().is_some_and(|m| m.values().all(|v| v.is_string())) {
                return Err(corrupt("`__metadata__` must be an object of strings".into()));
            }
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("tensor `{name}`: {}", describe_info_error(&e))))?;
        infos.push((name, info));
    }
    infos.sort_by_key(|(_, info)| info.data_offsets);

    for (name, info) in &infos {
        let (begin, end) = info.data_offsets;
        let shape = &info.shape;
        let expected_bits = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(info.dtype.bitsize() as u64));
        let Some(bits) = expected_bits.filter(|bits| bits % 8 == 0) else {
            return Err(corrupt(format!(
                "tensor `{name}` has shape {shape:?}, too large or not whole bytes for {}",
                info.dtype
            )));
        };
        let expected = bits / 8;
        let Some(found) = end.checked_sub(begin) else {
            return Err(corrupt(format!(
                "tensor `{name}` has data_offsets [{begin}, {end}], which end before they begin"
            )));
        };
        if expected != found as u64 {
            return Err(corrupt(format!(
                "tensor `{name}` has shape {shape:?} and dtype {}, which needs {expected} bytes, \
                 but its data_offsets [{begin}, {end}] span {found} bytes",
                info.dtype
            )));
        }
        let (start, stop) = (header_end.saturating_add(begin as u64), header_end.saturating_add(end as u64));
        if stop > file_size {
            return Err(truncated(format!("the data of tensor `{name}`"), start, stop));
        }
    }
    // The header fits in the file, so its end fits in a usize.
    Ok(header_end as usize)
}

/// Rephrases serde's message for an unknown dtype, which otherwise lists every variant
/// of the crate's `Dtype` without saying it is about the dtype.
fn describe_info_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("unknown variant") {
        format!("unknown dtype ({msg})")
    } else {
        format!("invalid tensor entry ({msg}); expected {{\"dtype\", \"shape\", \"data_offsets\"}}")
    }
}

/// Explains an error of the `safetensors` crate that [`precheck`] did not catch.
fn explain(e: SafeTensorError, file: &[u8], data_start: usize) -> String {
    match e {
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor `{name}` has data_offsets that do not start where the previous tensor ends \
             (tensor data must be contiguous)"
        ),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors do not cover the data section exactly ({} bytes after the header)",
            file.len().saturating_sub(data_start)
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::TempFile;
    use super::super::{CheckpointError, CheckpointKind, load};
    use half::{bf16, f16};
    use kiln_ir::Format;
    use safetensors::tensor::{Dtype, TensorView};
    use std::collections::HashMap;

    fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to(v)).collect()
    }

    /// A small file with f32, f16 and bf16 tensors, an I64 tensor and metadata.
    fn sample() -> Vec<u8> {
        let f32s = le_bytes(&[1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0], f32::to_le_bytes);
        let f16s = le_bytes(&[f16::from_f32(0.5), f16::from_f32(-1.25)], f16::to_le_bytes);
        let bf16s = le_bytes(&[bf16::from_f32(3.0), bf16::from_f32(-0.375), bf16::from_f32(96.0)], bf16::to_le_bytes);
        let ids = le_bytes(&[0i64, 1, 2], i64::to_le_bytes);
        let views = [
            ("w.f32", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
            ("w.f16", TensorView::new(Dtype::F16, vec![2], &f16s).unwrap()),
            ("w.bf16", TensorView::new(Dtype::BF16, vec![3, 1], &bf16s).unwrap()),
            ("position_ids", TensorView::new(Dtype::I64, vec![1, 3], &ids).unwrap()),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    #[test]
    fn round_trips_values() {
        let file = TempFile::write("sample.safetensors", &sample());
        let ckpt = load(&file.0).unwrap();
        assert_eq!(ckpt.kind, CheckpointKind::Safetensors);
        assert_eq!(ckpt.tensors.len(), 3);
        assert_eq!(ckpt.meta_str("format"), Some("pt"));
        assert_eq!(ckpt.skipped, [("position_ids".to_string(), "I64".to_string())]);

        let w = ckpt.require("w.f32").unwrap();
        assert_eq!((w.format, w.shape.as_slice()), (Format::F32, &[2, 3][..]));
        assert_eq!(w.to_f32().unwrap(), [1.0, -2.5, 3.25, 0.0, 1e-3, 7.0]);
        let w = ckpt.require("w.f16").unwrap();
        assert_eq!((w.format, w.shape.as_slice()), (Format::F16, &[2][..]));
        assert_eq!(w.to_f32().unwrap(), [0.5, -1.25]);
        let w = ckpt.require("w.bf16").unwrap();
        assert_eq!((w.format, w.shape.as_slice()), (Format::BF16, &[3, 1][..]));
        assert_eq!(w.to_f32().unwrap(), [3.0, -0.375, 96.0]);

        let err = ckpt.require("position_ids").unwrap_err();
        assert!(matches!(err, CheckpointError::UnsupportedDtype { .. }), "{err}");
        assert!(err.to_string().contains("has dtype I64, which kiln cannot use as a weight"), "{err}");
        let err = ckpt.require("w.f64").unwrap_err().to_string();
        assert!(err.contains("did you mean `w.f16` or `w.f32`?"), "{err}");
    }

    #[test]
    fn truncation_is_an_error_at_every_length() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let file = TempFile::write("cut.safetensors", &bytes[..len]);
            let err = load(&file.0).expect_err("truncated file must not load");
            assert!(err.to_string().contains(&file.0.display().to_string()), "{err}");
        }
        // Cut in the data section: the message names the tensor, its range and the size.
        let file = TempFile::write("cut.safetensors", &bytes[..bytes.len() - 4]);
        let err = load(&file.0).unwrap_err();
        let CheckpointError::Truncated { what, start, end, file_size, .. } = &err else { panic!("{err}") };
        assert!(what.contains("tensor `"), "{err}");
        assert!(*end > *file_size && *start < *end, "{err}");
        assert_eq!(*file_size as usize, bytes.len() - 4);
    }

    /// A file with `header` as its JSON header and `data_len` zero bytes of data.
    fn with_header(header: &str, data_len: usize) -> TempFile {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        TempFile::write("hdr.safetensors", &bytes)
    }

    fn corrupt_reason(file: &TempFile) -> String {
        let err = load(&file.0).unwrap_err();
        assert!(err.to_string().contains(&file.0.display().to_string()), "{err}");
        match err {
            CheckpointError::CorruptHeader { reason, .. } => reason,
            other => panic!("expected a corrupt header, got {other}"),
        }
    }

    #[test]
    fn corrupt_headers_are_explained() {
        let bad_json = with_header(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]"#, 8);
        assert!(corrupt_reason(&bad_json).contains("not a valid JSON object"));

        let bad_dtype = with_header(r#"{"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}"#, 8);
        let reason = corrupt_reason(&bad_dtype);
        assert!(reason.contains("tensor `w`: unknown dtype") && reason.contains("F128"), "{reason}");

        let mismatch = with_header(r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#, 8);
        let reason = corrupt_reason(&mismatch);
        assert!(
            reason.contains("tensor `w`") && reason.contains("needs 12 bytes") && reason.contains("span 8"),
            "{reason}"
        );

        let overflow =
            with_header(r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}"#, 8);
        assert!(corrupt_reason(&overflow).contains("tensor `w`"));

        let gap = with_header(
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#,
            12,
        );
        assert!(corrupt_reason(&gap).contains("tensor `b`"));

        let trailing = with_header(r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#, 6);
        assert!(corrupt_reason(&trailing).contains("do not cover the data section"));

        let past_end = with_header(r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, 4);
        let err = load(&past_end.0).unwrap_err().to_string();
        assert!(err.contains("the data of tensor `w` occupies bytes") && err.contains("file is only"), "{err}");

        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend(b"{}");
        let huge = TempFile::write("huge.safetensors", &huge);
        assert!(corrupt_reason(&huge).contains("exceeds the limit"));
    }

    /// Loads all-MiniLM-L6-v2 if it is present on this machine.
    #[test]
    fn real_minilm() {
        let models = std::env::var_os("KILN_MODELS").map(std::path::PathBuf::from).unwrap_or_else(|| {
            std::path::Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models")
        });
        let path = models.join("minilm/model.safetensors");
        if !path.exists() {
            // `.ci/run` sets KILN_REQUIRE_MODELS=1: there, a missing checkpoint fails.
            assert!(std::env::var_os("KILN_REQUIRE_MODELS").is_none_or(|v| v != "1"), "{} not found", path.display());
            eprintln!("skipping: {} not found", path.display());
            return;
        }
        let ckpt = load(&path).unwrap();
        println!(
            "{}: {} tensors, skipped {:?}, metadata {:?}",
            path.display(),
            ckpt.tensors.len(),
            ckpt.skipped,
            ckpt.metadata
        );
        // 105 header entries: 104 tensors and `__metadata__`.
        assert_eq!(ckpt.tensors.len() + ckpt.skipped.len(), 104);
        assert_eq!(ckpt.meta_str("format"), Some("pt"));
        let w = ckpt.require("encoder.layer.5.output.dense.weight").unwrap();
        println!("encoder.layer.5.output.dense.weight: {} {:?}", w.format, w.shape);
        assert_eq!((w.format, w.shape.as_slice()), (Format::F32, &[384, 1536][..]));
        let err = ckpt.require("embeddings.position_ids").unwrap_err();
        println!("{err}");
        assert!(matches!(err, CheckpointError::UnsupportedDtype { .. }));
    }
}
