//! numpy's `.npz` (a zip of `.npy` files, as `np.savez` and `np.savez_compressed` write
//! them): entries stored or deflated, zip64 sizes, little-endian (or byte-order-free)
//! arrays in C order. The zip is read here from its central directory: a zip crate would
//! bring archive writing, encryption and other codecs tfmqc does not need; deflate comes
//! from `miniz_oxide`, already in the build (png uses it).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor};

/// Whether `bytes` start like a zip file (local file header or an empty archive).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

struct Entry {
    name: String,
    method: u16,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

/// The central directory of a zip archive.
fn entries(b: &[u8]) -> std::result::Result<Vec<Entry>, String> {
    // The end-of-central-directory record: the last "PK\5\6" within 64 KiB + 22 bytes.
    let from = b.len().saturating_sub(22 + 65535);
    let eocd = (from..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| b[i..].starts_with(b"PK\x05\x06"))
        .ok_or("no end of central directory (not a zip archive, or truncated)")?;
    let mut count = u16_at(b, eocd + 10).ok_or("truncated")? as u64;
    let mut cd = u32_at(b, eocd + 16).ok_or("truncated")? as u64;
    if (count == 0xFFFF || cd == 0xFFFF_FFFF)
        && eocd >= 20
        && b[eocd - 20..].starts_with(b"PK\x06\x07")
    {
        // zip64: the locator points at the zip64 end record.
        let rec = u64_at(b, eocd - 20 + 8).ok_or("truncated zip64 locator")? as usize;
        if !b.get(rec..).is_some_and(|r| r.starts_with(b"PK\x06\x06")) {
            return Err("bad zip64 end of central directory".into());
        }
        count = u64_at(b, rec + 32).ok_or("truncated")?;
        cd = u64_at(b, rec + 48).ok_or("truncated")?;
    }
    let mut at = cd as usize;
    let mut out = vec![];
    for _ in 0..count {
        if !b.get(at..).is_some_and(|r| r.starts_with(b"PK\x01\x02")) {
            return Err("bad central directory entry".into());
        }
        let flags = u16_at(b, at + 8).ok_or("truncated")?;
        let method = u16_at(b, at + 10).ok_or("truncated")?;
        let mut compressed = u32_at(b, at + 20).ok_or("truncated")? as u64;
        let mut size = u32_at(b, at + 24).ok_or("truncated")? as u64;
        let name_len = u16_at(b, at + 28).ok_or("truncated")? as usize;
        let extra_len = u16_at(b, at + 30).ok_or("truncated")? as usize;
        let comment_len = u16_at(b, at + 32).ok_or("truncated")? as usize;
        let mut local_offset = u32_at(b, at + 42).ok_or("truncated")? as u64;
        let name = b
            .get(at + 46..at + 46 + name_len)
            .ok_or("truncated entry name")?;
        let name = String::from_utf8_lossy(name).to_string();
        if flags & 1 != 0 {
            return Err(format!("entry '{name}' is encrypted"));
        }
        // zip64 extra field: the 0xFFFFFFFF values, in order.
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("truncated extra field")?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = u16_at(extra, e).unwrap_or(0);
            let len = u16_at(extra, e + 2).unwrap_or(0) as usize;
            if id == 1 {
                let mut f = e + 4;
                for v in [&mut size, &mut compressed, &mut local_offset] {
                    if *v == 0xFFFF_FFFF {
                        *v = u64_at(extra, f).ok_or("truncated zip64 field")?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        out.push(Entry {
            name,
            method,
            compressed,
            size,
            local_offset,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// The bytes of one entry.
fn entry_data(b: &[u8], e: &Entry) -> std::result::Result<Vec<u8>, String> {
    let at = e.local_offset as usize;
    if !b.get(at..).is_some_and(|r| r.starts_with(b"PK\x03\x04")) {
        return Err(format!("entry '{}': bad local header", e.name));
    }
    let name_len = u16_at(b, at + 26).ok_or("truncated")? as usize;
    let extra_len = u16_at(b, at + 28).ok_or("truncated")? as usize;
    let start = at + 30 + name_len + extra_len;
    let data = usize::try_from(e.compressed)
        .ok()
        .and_then(|len| b.get(start..start.checked_add(len)?))
        .ok_or_else(|| format!("entry '{}' is truncated", e.name))?;
    let out = match e.method {
        0 => data.to_vec(),
        8 => {
            // Deflate expands at most 1032:1; a larger declared size cannot be real, and
            // the declared size bounds what is inflated (no zip bomb fills memory).
            let most = (data.len() as u64).saturating_mul(1032).saturating_add(64);
            if e.size > most {
                return Err(format!(
                    "entry '{}' says {} bytes inflate from {}: not possible with deflate",
                    e.name,
                    e.size,
                    data.len()
                ));
            }
            miniz_oxide::inflate::decompress_to_vec_with_limit(data, e.size as usize)
                .map_err(|err| format!("entry '{}': bad deflate data ({err:?})", e.name))?
        }
        m => {
            return Err(format!(
                "entry '{}' uses zip compression method {m} (np.savez stores, np.savez_compressed deflates; tfmqc reads those two)",
                e.name
            ))
        }
    };
    if out.len() as u64 != e.size {
        return Err(format!(
            "entry '{}': {} bytes, the directory says {}",
            e.name,
            out.len(),
            e.size
        ));
    }
    Ok(out)
}

/// A value of the `.npy` header dict: the text after `'key':` up to the next top-level
/// comma or closing brace.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

/// One `.npy` array.
pub fn parse_npy(b: &[u8]) -> std::result::Result<Tensor, String> {
    if !b.starts_with(b"\x93NUMPY") || b.len() < 10 {
        return Err("not a .npy array (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match b[6] {
        1 => (u16_at(b, 8).ok_or("truncated")? as usize, 10),
        2 | 3 => (u32_at(b, 8).ok_or("truncated")? as usize, 12),
        v => return Err(format!(".npy format version {v} is not known")),
    };
    let header = std::str::from_utf8(b.get(start..start + header_len).ok_or("truncated header")?)
        .map_err(|_| "the .npy header is not text")?;
    let descr = header_value(header, "descr")
        .ok_or("the .npy header has no 'descr'")?
        .trim_matches(['\'', '"']);
    let fortran = header_value(header, "fortran_order").unwrap_or("False");
    let shape_text = header_value(header, "shape").ok_or("the .npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_text}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    if fortran.starts_with("True") && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err("a Fortran-order array (save np.ascontiguousarray(a))".into());
    }
    // The byte-order character first ('<', '>', '|', '='), then the type code.
    let order = descr
        .chars()
        .next()
        .ok_or("the .npy header's 'descr' is empty")?;
    let code = &descr[order.len_utf8()..];
    let dtype = match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "i2" => DType::I16,
        "i1" => DType::I8,
        "u8" => DType::U64,
        "u4" => DType::U32,
        "u2" => DType::U16,
        "u1" => DType::U8,
        "b1" => DType::Bool,
        _ => {
            return Err(format!(
                "dtype '{descr}' is not a numeric array tfmqc reads"
            ))
        }
    };
    if order == '>' && dtype.bits() > 8 {
        return Err(format!(
            "dtype '{descr}' is big-endian (save a.astype(a.dtype.newbyteorder('<')))"
        ));
    }
    let data = b[start + header_len..].to_vec();
    Tensor::from_raw(dtype, shape, data).map_err(|e| e.to_string())
}

/// Every array of an `.npz` file, keyed by name (the entry name without `.npy`).
pub fn read_npz(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let bad = |why: String| Error::invalid(format!("{}: {why}", path.display()));
    let mut out = BTreeMap::new();
    for e in entries(bytes).map_err(|w| bad(format!("not a readable .npz: {w}")))? {
        if e.name.ends_with('/') {
            continue;
        }
        let data = entry_data(bytes, &e).map_err(bad)?;
        let key = e.name.strip_suffix(".npy").unwrap_or(&e.name).to_string();
        let t = parse_npy(&data).map_err(|w| bad(format!("array '{key}': {w}")))?;
        out.insert(key, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    }

    /// A zip with stored entries (what np.savez writes, less the zip64 extras).
    fn zip(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![];
        let mut central = vec![];
        for (name, data) in files {
            let offset = out.len() as u32;
            let mut local = b"PK\x03\x04".to_vec();
            local.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            local.extend_from_slice(&0u32.to_le_bytes()); // crc (not checked)
            local.extend_from_slice(&(data.len() as u32).to_le_bytes());
            local.extend_from_slice(&(data.len() as u32).to_le_bytes());
            local.extend_from_slice(&(name.len() as u16).to_le_bytes());
            local.extend_from_slice(&0u16.to_le_bytes());
            local.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&local);
            out.extend_from_slice(data);
            let mut c = b"PK\x01\x02".to_vec();
            c.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            c.extend_from_slice(&0u32.to_le_bytes());
            c.extend_from_slice(&(data.len() as u32).to_le_bytes());
            c.extend_from_slice(&(data.len() as u32).to_le_bytes());
            c.extend_from_slice(&(name.len() as u16).to_le_bytes());
            c.extend_from_slice(&[0; 12]);
            c.extend_from_slice(&offset.to_le_bytes());
            c.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&c);
        }
        let cd = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn reads_stored_arrays_of_several_types() {
        let f: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let i: Vec<u8> = [7i64, 9, 11].iter().flat_map(|v| v.to_le_bytes()).collect();
        let z = zip(&[
            ("sample.npy", npy("<f4", "(2, 1)", &f)),
            ("timestep.npy", npy("<i8", "(3,)", &i)),
            ("scalar.npy", npy("<f4", "()", &f[..4])),
        ]);
        assert!(is_zip(&z));
        let t = read_npz(Path::new("x.npz"), &z).unwrap();
        assert_eq!(t["sample"].shape, vec![2, 1]);
        assert_eq!(t["sample"].to_f32_vec().unwrap(), vec![1.5, -2.0]);
        assert_eq!(t["timestep"].to_i64_vec().unwrap(), vec![7, 9, 11]);
        assert_eq!(t["scalar"].shape, Vec::<usize>::new());
    }

    #[test]
    fn bad_files_name_the_file_and_the_array() {
        let e = read_npz(Path::new("c.npz"), b"PK\x03\x04garbage")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.npz") && e.contains("not a readable .npz"),
            "{e}"
        );
        let z = zip(&[("x.npy", npy(">f4", "(1,)", &[0; 4]))]);
        let e = read_npz(Path::new("c.npz"), &z).unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("big-endian"), "{e}");
        let z = zip(&[("x.npy", npy("<f4", "(3,)", &[0; 4]))]);
        assert!(read_npz(Path::new("c.npz"), &z).is_err(), "short data");
        let z = zip(&[("o.npy", npy("|O", "(1,)", &[0; 8]))]);
        let e = read_npz(Path::new("c.npz"), &z).unwrap_err().to_string();
        assert!(e.contains("'o'") && e.contains("|O"), "{e}");
    }

    #[test]
    fn a_descr_without_a_type_code_is_an_error_not_a_panic() {
        for descr in ["", "é4", "<"] {
            let z = zip(&[("x.npy", npy(descr, "(1,)", &[0; 4]))]);
            let e = read_npz(Path::new("c.npz"), &z).unwrap_err().to_string();
            assert!(e.contains("c.npz") && e.contains("'x'"), "{descr}: {e}");
        }
    }

    #[test]
    fn sizes_that_cannot_be_real_are_refused_before_reading() {
        // A stored entry claiming 2^64 - 1 compressed bytes.
        let mut z = zip(&[("x.npy", npy("<f4", "(1,)", &[0; 4]))]);
        let cd = z.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        z[cd + 20..cd + 24].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read_npz(Path::new("c.npz"), &z).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // A deflated entry that would inflate past deflate's 1032:1.
        let e = entry_data(
            &z,
            &Entry {
                name: "bomb.npy".into(),
                method: 8,
                compressed: 4,
                size: 1 << 40,
                local_offset: 0,
            },
        )
        .unwrap_err();
        assert!(e.contains("bomb.npy") && e.contains("not possible"), "{e}");
    }

    #[test]
    fn a_shape_whose_size_overflows_is_an_error() {
        let z = zip(&[("x.npy", npy("<f4", "(4294967296, 4294967296, 4)", &[0; 4]))]);
        let e = read_npz(Path::new("c.npz"), &z).unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("overflows"), "{e}");
    }
}
