"""Inverting Gradients (Geiping et al., NeurIPS 2020).

Cosine gradient matching plus total variation, Adam on the *sign* of the image gradient, a box
constraint to [0, 1], multi-step learning-rate decay at 3/8, 5/8 and 7/8 of the budget, several
restarts optimised as one batched problem, and the restart with the lowest matching loss kept.
"""
