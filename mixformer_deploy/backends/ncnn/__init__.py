"""ncnn backend: the rank-4 form of the deploy form (graph), its pnnx conversion and ncnn runs (convert)."""
