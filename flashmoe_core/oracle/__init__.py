"""The NumPy oracle: the forward and backward as the rules state them, and over
mpi4py ranks."""
