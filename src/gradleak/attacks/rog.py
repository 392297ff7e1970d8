"""ROG (Yue et al., "Gradient Obfuscation Gives a False Sense of Security in Federated Learning",
USENIX Security 2023).

Optimise a low-resolution latent image (``scale_factor`` 4: 16x16 for 64 px, 32x32 for 128 px), decode
it by bicubic upsampling, match the (obfuscated) update — squared L2 as ROG, or cosine — with Adam and
cosine annealing, then improve the decoded images with a learned post-processing network when one is
given (``run_attack(..., postprocess=...)``); the result is reported with and without it.
"""
