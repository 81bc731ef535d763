import sys
from memopt.kernels import sass
pat = sys.argv[1:]
for v in sass.variants():
    if all(p in (v.kernel + " " + v.label + " ") for p in pat):
        r = sass.compile_variant(v, 90)
        print(f"{v.kernel:28s} {v.label:45s} {r['per_element']:6.2f}/{r['budget']:6.1f} regs {r['registers']} spilled {r['spilled_bytes']}")
