"""Fused Triton kernels (ema, latent_loss), each with a plain-torch reference and a dispatch that runs
Triton on CUDA tensors and the reference elsewhere; aot compiles them without a GPU, bench times them."""
