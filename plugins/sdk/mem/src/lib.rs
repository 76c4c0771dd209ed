//! `memcmp` for plugins, eight bytes at a time.
//!
//! wasi-libc's `memcmp` (which `wasm32-wasip2` links) compares one byte per loop turn, and a
//! plugin compares strings all the time: every JSON field name the parser matches, every
//! state key a hash map or a sort compares. Defined here, it is the one the linker takes
//! (wasi-libc's is only pulled from its archive when nothing defines the symbol); `bcmp`,
//! which Rust's `==` on slices calls, is wasi-libc's and calls this. A crate of its own
//! because of `no_builtins`: without it LLVM may recognise the loops below as a `memcmp`
//! and call the function from itself.
#![no_std]
#![no_builtins]

/// Compares `n` bytes at `a` and `b`: negative, zero or positive as the first byte that
/// differs is smaller in `a`, absent, or larger.
///
/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { compare(a, b, n) }
}

/// The comparison itself, for any target (tested natively).
///
/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[inline(always)]
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, and the caller guarantees `n` readable bytes.
        let (x, y) = unsafe {
            (
                (a.add(i) as *const u64).read_unaligned(),
                (b.add(i) as *const u64).read_unaligned(),
            )
        };
        if x != y {
            // Byte order in memory: the first differing byte is the lowest in a
            // little-endian word.
            let x = u64::from_le(x);
            let y = u64::from_le(y);
            let shift = (x ^ y).trailing_zeros() / 8 * 8;
            return i32::from((x >> shift) as u8) - i32::from((y >> shift) as u8);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::compare;

    fn sign(x: i32) -> i32 {
        x.signum()
    }

    #[test]
    fn orders_like_slices_do() {
        let samples: [&[u8]; 9] = [
            b"",
            b"a",
            b"user:00001",
            b"user:00002",
            b"user:10001",
            b"page_view",
            b"page_vie\xff",
            b"0123456789abcdefX",
            b"0123456789abcdefY",
        ];
        for a in samples {
            for b in samples {
                let n = a.len().min(b.len());
                let want = a[..n].cmp(&b[..n]) as i32;
                let got = unsafe { compare(a.as_ptr(), b.as_ptr(), n) };
                assert_eq!(sign(got), want, "{a:?} vs {b:?}");
            }
        }
    }
}
