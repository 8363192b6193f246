"""Export of rewritten decode steps: ONNX (:mod:`.onnx`) and TensorRT (:mod:`.tensorrt`).

Both take a :class:`~entmaxkv_compile.rewrite.RewriteResult` and make the step's state explicit
(``past.*`` inputs, ``present.*`` outputs, :mod:`.explicit_state`). The submodules are imported on
use, so ``onnx`` and ``torch_tensorrt`` stay optional.
"""
