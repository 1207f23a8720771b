//! DMA memory: one mmap'd, locked region exposed as `GuestMemoryMmap` whose addresses are IOVAs.
