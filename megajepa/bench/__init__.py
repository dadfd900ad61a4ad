"""`megajepa bench CONFIG`: the training modes side by side (command), what a mode is (modes),
the run on every rank (run), FLOPs and MFU (flops), memory (memory), the loader's throughput (loader), the outputs (report)."""
