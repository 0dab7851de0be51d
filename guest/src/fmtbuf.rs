//! Text formatted into a fixed buffer: the guest has no allocator, and some
//! text must exist as bytes in guest RAM (a record written to a file) or be
//! kept for later (a failure's detail).

use core::fmt;

/// Up to `N` bytes of formatted text. Output past `N` bytes is dropped (cut
/// at a character boundary), never an error, so a long detail only loses
/// its end.
pub struct FmtBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FmtBuf<N> {
    pub const fn new() -> Self {
        FmtBuf {
            buf: [0; N],
            len: 0,
        }
    }

    /// `args`, formatted.
    pub fn format(args: fmt::Arguments) -> Self {
        let mut text = Self::new();
        // `write_str` never fails; a failing `Display` impl only cuts it short.
        let _ = fmt::Write::write_fmt(&mut text, args);
        text
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Only whole characters of `&str`s are ever copied in.
        core::str::from_utf8(self.as_bytes()).unwrap_or("<bad text>")
    }
}

impl<const N: usize> Default for FmtBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for FmtBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut take = s.len().min(N - self.len);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

impl<const N: usize> fmt::Display for FmtBuf<N> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
