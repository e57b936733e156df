set -x
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 200 python3 -m pytest -q -x tests/ops/test_cuda_launch.py tests/nn/test_linear_cuda.py tests/nn/test_linear_kernel_layout.py -p no:cacheprovider 2>&1 | tee $OUT/pytest1.txt | tail -40
timeout 60 python3 .devrun/prof.py 2>&1 | tee $OUT/prof.txt
timeout 240 python3 benchmarks/bench_decode.py --layers 4 --new 32 --prefill 512,2048 --repeats 3 --methods dense,marlin:int4,marlin:fp4,tinygemm --json $OUT/bd1.json --markdown $OUT/bd1.md 2>&1 | grep -v Warning | tail -40
