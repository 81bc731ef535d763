import torch
from memopt.functional.quantize import create_dynamic_map, code_midpoints
def lut(code, M, E_LO):
    mids = code_midpoints(code)
    NE = 127 - E_LO + 2  # cell 0: |x| < 2^(E_LO-127); cells 1..: exponent E_LO..127 (and above, clamped)
    los, his = [], []
    for s in (0, 1):
        for ce in range(NE):
            for mt in range(2**M):
                if ce == 0:
                    if mt: lo_b, hi_b = 0, 0
                    else: lo_b, hi_b = 0, (E_LO << 23) - 1
                else:
                    e = E_LO + ce - 1
                    lo_b = (e << 23) | (mt << (23 - M)); hi_b = lo_b | ((1 << (23 - M)) - 1)
                    if ce == NE - 1 and mt == 2**M - 1:
                        hi_b = 0x7F7FFFFF
                lo = torch.tensor([lo_b], dtype=torch.int32).view(torch.float32).item()
                hi = torch.tensor([hi_b], dtype=torch.int32).view(torch.float32).item()
                if s: lo, hi = -hi, -lo
                los.append(lo); his.append(hi)
    lo = torch.tensor(los); hi = torch.tensor(his)
    low = torch.bucketize(lo, mids, right=False); high = torch.bucketize(hi, mids, right=False)
    return low, int((high - low).max()), len(los)
for signed in (True, False):
    for M in (3, 4, 5, 6):
        for E in (100, 105):
            low, extra, size = lut(create_dynamic_map(signed), M, E)
            print(signed, M, E, extra, size)
