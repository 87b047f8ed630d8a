//! The folder fuzzed models live in: external data resolves here.

use std::path::PathBuf;

/// Bytes of `w.data` in [`model_folder`]: zeros, as much as the largest initializer of
/// the skeleton seeds (fuzz/make_seeds.py points them all at its start).
pub const W_DATA_BYTES: usize = 1 << 22;

/// A new folder `<root>/model/` holding `w.data` (`W_DATA_BYTES` zeros) and `out.data`,
/// a symbolic link to `<root>/outside.bin`, outside it: a location naming the link must
/// be refused. `<root>` is `$TFMQC_FUZZ_DIR` (scripts/fuzz.sh: one per target, made anew
/// each run), else a temporary folder left behind.
pub fn model_folder() -> PathBuf {
    let root = match std::env::var_os("TFMQC_FUZZ_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("TFMQC_FUZZ_DIR");
            d
        }
        None => tempfile::tempdir().expect("temporary folder").keep(),
    };
    let dir = root.join("model");
    std::fs::create_dir(&dir).expect("model folder");
    std::fs::write(dir.join("w.data"), vec![0u8; W_DATA_BYTES]).expect("w.data");
    std::fs::write(root.join("outside.bin"), [7u8; 64]).expect("outside file");
    std::os::unix::fs::symlink(root.join("outside.bin"), dir.join("out.data"))
        .expect("symbolic link");
    dir
}
