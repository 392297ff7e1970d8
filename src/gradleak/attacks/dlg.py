"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its iDLG variant (Zhao et al. 2020).

DLG: squared-L2 gradient matching, L-BFGS (no line search, step 1, as the reference code), images
and *soft labels* optimised jointly from random starts, no image prior and no box constraint (the
result is clipped to [0, 1] at the end). iDLG (preset ``idlg``): the same with the labels read off the
last layer's gradient instead of optimised. Restarts run as one batched problem with an independent
L-BFGS history per restart.
"""
