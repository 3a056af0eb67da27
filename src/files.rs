//! The small files a configuration names (the config itself, token files, certificates and
//! keys): read with a bound, and only when they are regular files.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The bytes of the regular file at `path`, at most `most` of them. Anything else is
/// refused without waiting on it: a FIFO (opened non-blocking, so a FIFO nobody writes does
/// not hang the start), a device such as `/dev/zero`, a directory; so is a larger file.
pub fn read_small_file(path: &Path, most: usize) -> io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(most as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > most {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, format!("larger than {most} bytes")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_bound_are_read() {
        let dir = std::env::temp_dir().join(format!("wg-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("small");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_small_file(&file, 5).unwrap(), b"12345");
        assert_eq!(read_small_file(&file, 4).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        for refused in [&fifo, Path::new("/dev/zero"), &dir] {
            let error = read_small_file(refused, 64).unwrap_err().to_string();
            assert!(error.contains("not a regular file"), "{}: {error}", refused.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
