//! Reading another process's memory with `process_vm_readv` (never ptrace: the target is not
//! stopped or modified), and parsing `/proc/<pid>/maps`.
//!
//! Pointers read from the target are untrusted (a frame freed mid-read, a torn write): callers
//! offset them with `wrapping_add`, never `+`, since a wrapped address is simply unmapped and
//! its read fails, where `+` would panic on overflow.

use std::io;

/// A process's memory as the interpreter readers see it: [`ProcMem`] for a live process, a
/// [`MemoryImage`] for tests and fuzzing. Everything read is untrusted.
pub trait RemoteMemory {
    /// Fill `buf` from `addr`; a short read is an error.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;

    fn read_vec(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_i32(&self, addr: u64) -> io::Result<i32> {
        Ok(self.read_u32(addr)? as i32)
    }

    fn read_i64(&self, addr: u64) -> io::Result<i64> {
        Ok(self.read_u64(addr)? as i64)
    }

    fn read_u8(&self, addr: u64) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    /// A NUL-terminated C string of at most `max` bytes.
    fn read_cstr(&self, addr: u64, max: usize) -> io::Result<String> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < max {
            // Do not cross a page boundary with one read: the next page may be unmapped.
            let to_page = 4096 - ((addr as usize).wrapping_add(out.len()) % 4096);
            let n = chunk.len().min(to_page);
            self.read(addr.wrapping_add(out.len() as u64), &mut chunk[..n])?;
            if let Some(z) = chunk[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Read-only view of a process's address space.
#[derive(Clone, Copy, Debug)]
pub struct ProcMem {
    pub pid: u32,
}

impl ProcMem {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }
}

impl RemoteMemory for ProcMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if addr == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read at address 0",
            ));
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which is valid for writes of its length; the remote
        // side is checked by the kernel.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read at {addr:#x}: {n} of {} bytes", buf.len()),
            ));
        }
        Ok(())
    }
}

/// Memory made of one byte image at `base` (tests, fuzzing): reads outside it fail.
#[derive(Clone, Debug, Default)]
pub struct MemoryImage {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl RemoteMemory for MemoryImage {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let outside =
            || io::Error::new(io::ErrorKind::UnexpectedEof, format!("{addr:#x} unmapped"));
        let start = usize::try_from(addr.checked_sub(self.base).ok_or_else(outside)?)
            .map_err(|_| outside())?;
        let end = start.checked_add(buf.len()).ok_or_else(outside)?;
        buf.copy_from_slice(self.bytes.get(start..end).ok_or_else(outside)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let v: u64 = 0x1122_3344_5566_7788;
        let mem = ProcMem::new(std::process::id());
        assert_eq!(mem.read_u64(&v as *const u64 as u64).unwrap(), v);
        let s = b"hello\0";
        assert_eq!(mem.read_cstr(s.as_ptr() as u64, 100).unwrap(), "hello");
    }
}
