//! The bytes of a tensor, shared instead of copied.
//!
//! A Stable-Diffusion-class UNet carries 3.4 GB of weights. The pipeline clones the model
//! (the float original is kept for evaluation), hands it to tract several times and
//! writes it back; with `Vec<u8>` every one of those was a full copy. `Bytes` is a
//! reference-counted slice: cloning costs nothing, and weights read from an ONNX
//! external-data file stay a *view of that file* (memory-mapped, paged in on use and
//! paged out by the kernel under pressure) until a pass replaces them. A mapped tensor
//! remembers where it came from, so the model can be handed to tract by reference (the
//! proto names the file, offset and length) instead of by value.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a mapped tensor's bytes live on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpan {
    /// The external-data file (absolute, or as given with the model's folder).
    pub file: Arc<PathBuf>,
    pub offset: usize,
    pub len: usize,
}

#[derive(Clone)]
enum Repr {
    Owned(Arc<Vec<u8>>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        span: FileSpan,
    },
}

/// Immutable, cheaply cloned tensor bytes (see the module documentation).
#[derive(Clone)]
pub struct Bytes(Repr);

impl Bytes {
    /// A view of `span` inside a mapping of `span.file` (which must hold it).
    pub fn mapped(map: Arc<memmap2::Mmap>, span: FileSpan) -> Bytes {
        assert!(
            span.offset + span.len <= map.len(),
            "span beyond the mapping"
        );
        Bytes(Repr::Mapped { map, span })
    }

    /// The file region this tensor is a view of, if it is one.
    pub fn file_span(&self) -> Option<&FileSpan> {
        match &self.0 {
            Repr::Mapped { span, .. } => Some(span),
            Repr::Owned(_) => None,
        }
    }

    /// Tells the kernel the pages of a mapped tensor are not needed for now: they leave
    /// this process's resident memory and are read again from the file on the next use.
    /// Called after a pass has read a weight it will not read again, so that a pass over
    /// all the weights does not keep them all resident. No-op for owned bytes.
    pub fn release_pages(&self) {
        if let Repr::Mapped { map, span } = &self.0 {
            // Only whole pages strictly inside the span: a neighbour's pages may be in use.
            let page = 4096;
            let start = span.offset.div_ceil(page) * page;
            let end = (span.offset + span.len) / page * page;
            if end > start {
                // SAFETY: the mapping is a read-only private file mapping; dropping its
                // pages only means they are read from the file again when touched, which
                // cannot change what any slice of it reads.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// The bytes as an owned vector (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.deref().to_vec()
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { map, span } => &map[span.offset..span.offset + span.len],
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(Repr::Owned(Arc::new(v)))
    }
}

impl Default for Bytes {
    fn default() -> Bytes {
        Bytes::from(Vec::new())
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        self.deref() == other.deref()
    }
}

impl PartialEq<Vec<u8>> for Bytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.deref() == other.as_slice()
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Owned(v) => write!(f, "Bytes({} owned)", v.len()),
            Repr::Mapped { span, .. } => write!(
                f,
                "Bytes({} mapped at {} of {})",
                span.len,
                span.offset,
                span.file.display()
            ),
        }
    }
}

/// Memory maps of external-data files, one per file, shared by every tensor in it.
#[derive(Default)]
pub struct FileMaps {
    maps: Vec<(PathBuf, Arc<memmap2::Mmap>)>,
}

impl FileMaps {
    /// The mapping of `path`, made on first use.
    pub fn map(&mut self, path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
        if let Some((_, m)) = self.maps.iter().find(|(p, _)| p == path) {
            return Ok(m.clone());
        }
        let file = std::fs::File::open(path)?;
        // SAFETY: the file is mapped read-only. Another process truncating it while we
        // run would fault; the ONNX external-data contract (and our atomic writes) is
        // that model files are replaced by rename, not rewritten in place.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file)? });
        self.maps.push((path.to_path_buf(), map.clone()));
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_bytes_compare_by_content_and_clone_cheaply() {
        let a = Bytes::from(vec![1u8, 2, 3]);
        let b = a.clone();
        assert_eq!(a, b);
        assert_eq!(&a[..], &[1, 2, 3]);
        assert!(a.file_span().is_none());
    }

    #[test]
    fn mapped_bytes_read_their_span_of_the_file() {
        let dir = std::env::temp_dir().join(format!("tfmqc-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.data");
        std::fs::write(&path, (0..=255u8).cycle().take(10_000).collect::<Vec<_>>()).unwrap();
        let mut maps = FileMaps::default();
        let map = maps.map(&path).unwrap();
        let span = FileSpan {
            file: Arc::new(path.clone()),
            offset: 4100,
            len: 5000,
        };
        let b = Bytes::mapped(map, span.clone());
        assert_eq!(b.len(), 5000);
        assert_eq!(b[0], (4100 % 256) as u8);
        assert_eq!(b.file_span(), Some(&span));
        b.release_pages();
        // Still readable after the pages were dropped: they come back from the file.
        assert_eq!(b[4999], ((4100 + 4999) % 256) as u8);
        assert_eq!(b, Bytes::from(b.to_vec()));
        // One mapping per file.
        assert!(Arc::ptr_eq(
            &maps.map(&path).unwrap(),
            &maps.map(&path).unwrap()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
