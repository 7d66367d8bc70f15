"""A valid safetensors file of MIB MiB for the service benchmarks: one f32 4096x4096 tensor per
64 MiB, the data left sparse (zeros), so the client's reads cost nothing and the figures are the
server's. Usage: python3 benches/sparse_model.py PATH MIB"""
import json
import struct
import sys

path, mib = sys.argv[1], int(sys.argv[2])
n, per = mib // 64, 64 << 20
header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [i * per, (i + 1) * per]} for i in range(n)}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    f.truncate(8 + len(h) + n * per)
