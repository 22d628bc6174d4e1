"""fastlora: fine-tune small GPT models on a CPU, fully or with LoRA, on NumPy + Cython kernels."""
from fastlora import kernels
from fastlora._threads import get_num_threads, set_num_threads
from fastlora.autograd import Tensor, cross_entropy, no_grad
from fastlora.nn import GPT

__version__ = "0.1.0"

__all__ = ["Tensor", "no_grad", "GPT", "cross_entropy", "kernels", "get_num_threads",
           "set_num_threads"]
