//! AMX-INT8 tile blocks: a `16·mt × 16·nt` block of i32 accumulators (`mt`, `nt` ∈ {1, 2})
//! summed over K steps of `kq` quads, on the tile unit where the CPU has one and as a
//! plain-Rust emulation of the same instructions elsewhere (what the exactness tests run
//! on every CPU, and what a [`super::Packing::Tiles`] operand runs on below AMX).
//!
//! Tiles: `tmm0..3` accumulate (`C[i][j]` = rows `16i..`, columns `16j..`), `tmm4`/`tmm5`
//! hold the two row operands (16 rows of `kq` quads), `tmm6`/`tmm7` the two column operands
//! (`kq` rows of 16 quads). One step is `C[i][j] += A[i] · B[j]` with
//! `A[i][r][q] · B[j][q][c]` the dot product of quads (u8 × s8: `tdpbusd` when the row
//! operand is unsigned, `tdpbsud` when it is signed), exact in wrapping i32 like the other
//! kernels.
//!
//! Linux hands the tile state to a process only when asked (`arch_prctl
//! ARCH_REQ_XCOMP_PERM`); [`available`] asks once and says no when refused, so `Backend::Auto`
//! falls back to AVX-512 VNNI instead of faulting.

/// Rows of a tile and columns of an accumulator tile.
pub(crate) const TILE: usize = 16;
/// Most quads a tile row holds (64 bytes).
pub(crate) const MAX_KQ: usize = 16;

/// Whether the CPU has AMX-INT8 and the OS lets this process use the tile state.
pub(crate) fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            // CPUID.(EAX=7, ECX=0): EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let has = leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0;
            has && request_tile_permission()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: 0 when granted (process-wide,
/// inherited by threads).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain Linux system call; it reads its two integer arguments and clobbers
    // rcx and r11 as the syscall instruction does.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The shape of one tile block and where its operands lie, in i32 words (one quad a word).
/// Step `s` reads row operand `i` at `a[a_steps[s] + i * a_tile + r * a_stride ..][..kq]`
/// (row `r`) and column operand `j` at `b[b_steps[s] + j * b_tile + q * b_stride ..][..16]`
/// (quad row `q`).
pub(crate) struct Block<'a> {
    pub a: &'a [i32],
    pub a_stride: usize,
    pub a_tile: usize,
    pub b: &'a [i32],
    pub b_stride: usize,
    pub b_tile: usize,
    pub kq: usize,
    pub mt: usize,
    pub nt: usize,
}

impl Block<'_> {
    /// Panics unless every word a step at these offsets reads is in bounds (what keeps
    /// the tile loads sound).
    #[inline]
    fn check(&self, a_off: usize, b_off: usize) {
        assert!((1..=MAX_KQ).contains(&self.kq) && (1..=2).contains(&self.mt));
        assert!((1..=2).contains(&self.nt));
        let a_end = a_off + (self.mt - 1) * self.a_tile + (TILE - 1) * self.a_stride + self.kq;
        let b_end = b_off + (self.nt - 1) * self.b_tile + (self.kq - 1) * self.b_stride + TILE;
        assert!(
            a_end <= self.a.len() && b_end <= self.b.len(),
            "int8 tiles: operand out of bounds"
        );
    }
}

/// Accumulators of one block, row-major `[32][32]` (rows and columns past `16·mt`,
/// `16·nt` unused).
pub(crate) type Acc = [i32; 4 * TILE * TILE];
/// Words per accumulator row.
pub(crate) const ACC_ROW: usize = 2 * TILE;

/// Runs blocks on the tile unit or its emulation: `begin`, then per block `zero`, `step`
/// per K step, `store`; `end` releases the tile state.
pub(crate) enum Tiles {
    #[cfg(target_arch = "x86_64")]
    Unit {
        signed_rows: bool,
    },
    Emulated {
        signed_rows: bool,
        acc: Box<Acc>,
    },
}

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

impl Tiles {
    /// Tiles for blocks of `kq` quads a step: on the unit when `unit` (the caller checked
    /// [`available`]), else emulated. `signed_rows`: the row operand holds the s8 values
    /// (convolution weights) and the column operand the u8 ones, else the other way round.
    pub(crate) fn begin(unit: bool, signed_rows: bool, kq: usize) -> Tiles {
        assert!((1..=MAX_KQ).contains(&kq), "int8 tiles: {kq} quads a step");
        #[cfg(target_arch = "x86_64")]
        if unit {
            let mut cfg = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
                reserved2: [0; 16],
            };
            for t in 0..4 {
                (cfg.rows[t], cfg.colsb[t]) = (TILE as u8, 4 * TILE as u16);
            }
            for t in 4..6 {
                (cfg.rows[t], cfg.colsb[t]) = (TILE as u8, 4 * kq as u16);
            }
            for t in 6..8 {
                (cfg.rows[t], cfg.colsb[t]) = (kq as u8, 4 * TILE as u16);
            }
            // SAFETY: `unit` only where `available()` said the CPU has AMX and the OS
            // granted the tile state; the configuration is valid for palette 1.
            unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg, options(nostack)) };
            return Tiles::Unit { signed_rows };
        }
        let _ = unit;
        Tiles::Emulated {
            signed_rows,
            acc: Box::new([0; 4 * TILE * TILE]),
        }
    }

    /// Clears the accumulators.
    #[inline(always)]
    pub(crate) fn zero(&mut self) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles were configured by `begin` on this thread.
            Tiles::Unit { .. } => unsafe {
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                )
            },
            Tiles::Emulated { acc, .. } => acc.fill(0),
        }
    }

    /// One K step: `C[i][j] += A[i] · B[j]` with the operands at `a_off`, `b_off`.
    #[inline(always)]
    pub(crate) fn step(&mut self, blk: &Block, a_off: usize, b_off: usize) {
        blk.check(a_off, b_off);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check` bounds every row each load reads; tiles configured by `begin`.
            Tiles::Unit { signed_rows } => unsafe { unit_step(blk, a_off, b_off, *signed_rows) },
            Tiles::Emulated { signed_rows, acc } => {
                emulated_step(blk, a_off, b_off, *signed_rows, acc)
            }
        }
    }

    /// Writes the accumulators into `out`, row-major with [`ACC_ROW`] words a row.
    #[inline(always)]
    pub(crate) fn store(&self, out: &mut Acc) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: each store writes 16 rows of 64 bytes at a 128-byte pitch inside `out`
            // (rows 0..16 or 16..32, column halves at +0 / +64 bytes).
            Tiles::Unit { .. } => unsafe {
                let p = out.as_mut_ptr();
                let half = 4 * ACC_ROW * TILE;
                std::arch::asm!(
                    "tilestored [{p} + {s}*1], tmm0",
                    "tilestored [{p} + {s}*1 + 64], tmm1",
                    "tilestored [{q} + {s}*1], tmm2",
                    "tilestored [{q} + {s}*1 + 64], tmm3",
                    p = in(reg) p,
                    q = in(reg) (p as *mut u8).add(half),
                    s = in(reg) 4 * ACC_ROW,
                    options(nostack)
                );
            },
            Tiles::Emulated { acc, .. } => out.copy_from_slice(&acc[..]),
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Tiles::Unit { .. } = self {
            // SAFETY: releases the state `begin` configured on this thread.
            unsafe { std::arch::asm!("tilerelease", options(nostack)) };
        }
    }
}

/// One step on the tile unit.
///
/// # Safety
/// Tiles configured by [`Tiles::begin`] with `blk.kq`; operands checked by `Block::check`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unit_step(blk: &Block, a_off: usize, b_off: usize, signed_rows: bool) {
    use std::arch::asm;
    let a0 = blk.a.as_ptr().add(a_off);
    let b0 = blk.b.as_ptr().add(b_off);
    let (sa, sb) = (4 * blk.a_stride, 4 * blk.b_stride);
    asm!(
        "tileloadd tmm4, [{a} + {sa}*1]",
        "tileloadd tmm6, [{b} + {sb}*1]",
        a = in(reg) a0, sa = in(reg) sa, b = in(reg) b0, sb = in(reg) sb,
        options(nostack, readonly)
    );
    if blk.nt == 2 {
        asm!("tileloadd tmm7, [{b} + {sb}*1]", b = in(reg) b0.add(blk.b_tile), sb = in(reg) sb,
             options(nostack, readonly));
    }
    if blk.mt == 2 {
        asm!("tileloadd tmm5, [{a} + {sa}*1]", a = in(reg) a0.add(blk.a_tile), sa = in(reg) sa,
             options(nostack, readonly));
    }
    // The accumulator updates, signed or unsigned rows, for the tiles in use.
    macro_rules! dp {
        ($op:literal) => {{
            asm!(concat!($op, " tmm0, tmm4, tmm6"), options(nostack, nomem));
            if blk.nt == 2 {
                asm!(concat!($op, " tmm1, tmm4, tmm7"), options(nostack, nomem));
            }
            if blk.mt == 2 {
                asm!(concat!($op, " tmm2, tmm5, tmm6"), options(nostack, nomem));
                if blk.nt == 2 {
                    asm!(concat!($op, " tmm3, tmm5, tmm7"), options(nostack, nomem));
                }
            }
        }};
    }
    if signed_rows {
        dp!("tdpbsud");
    } else {
        dp!("tdpbusd");
    }
}

/// One step as the tile unit computes it, in plain Rust.
fn emulated_step(blk: &Block, a_off: usize, b_off: usize, signed_rows: bool, acc: &mut Acc) {
    let dot = |a: i32, b: i32| -> i32 {
        let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
        (0..4)
            .map(|i| {
                if signed_rows {
                    a[i] as i8 as i32 * b[i] as i32
                } else {
                    a[i] as i32 * b[i] as i8 as i32
                }
            })
            .fold(0i32, i32::wrapping_add)
    };
    for i in 0..blk.mt {
        for r in 0..TILE {
            let arow = &blk.a[a_off + i * blk.a_tile + r * blk.a_stride..][..blk.kq];
            for j in 0..blk.nt {
                let out = &mut acc[(i * TILE + r) * ACC_ROW + j * TILE..][..TILE];
                for (q, &av) in arow.iter().enumerate() {
                    let brow = &blk.b[b_off + j * blk.b_tile + q * blk.b_stride..][..TILE];
                    for (o, &bv) in out.iter_mut().zip(brow) {
                        *o = o.wrapping_add(dot(av, bv));
                    }
                }
            }
        }
    }
}
