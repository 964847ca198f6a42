import torch

# llmcore's kernels use torch's thread count: both sides get the same cores.
torch.set_num_threads(torch.get_num_threads())
