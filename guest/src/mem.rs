//! The memory functions the compiler calls (core needs them; there is no
//! libc). Written with string instructions so the compiler cannot recognise
//! them as copy loops and turn them back into calls to themselves, and so
//! that a copy at CPL0 is one emulated instruction rather than a loop.

use core::arch::asm;

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags));
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never
        // overwrites a byte before reading it.
        memcpy(dest, src, n)
    } else {
        // `dest` overlaps the tail of `src`: copy backwards, last byte first.
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rdi") dest.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            inout("rcx") n => _,
            options(nostack),
        );
        dest
    }
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") value as u8, options(nostack, preserves_flags));
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let (mut x, mut y): (u8, u8) = (0, 0);
    // `repe cmpsb` stops after the first differing byte; compare the pair
    // it stopped on (a zero length leaves both at 0: equal).
    asm!(
        "test rcx, rcx",
        "jz 2f",
        "repe cmpsb",
        "mov {x}, byte ptr [rsi - 1]",
        "mov {y}, byte ptr [rdi - 1]",
        "2:",
        x = inout(reg_byte) x,
        y = inout(reg_byte) y,
        inout("rsi") a => _,
        inout("rdi") b => _,
        inout("rcx") n => _,
        options(readonly, nostack),
    );
    i32::from(x) - i32::from(y)
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
