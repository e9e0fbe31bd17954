import sys, importlib.util, torch
sys.argv = ["kvpress_side_by_side.py"] + sys.argv[1:]
spec = importlib.util.spec_from_file_location("sbs", "scripts/gpu/kvpress_side_by_side.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
from kvpress.presses.kvzip_press import KVzipPress
orig = KVzipPress.compress_post
def post(self, model):
    sv = self.score_val.clone()
    orig(self, model)
    n_layer, bsz, h, L = sv.shape
    kept = []
    for layer in model.model.layers:
        b, hi, si = layer.self_attn.masked_key_indices
        kept.append(h * L - len(si))
    print("ctx_len", L, "per-layer kept of", h * L, kept, flush=True)
    torch.save(sv, "/tmp/kz4/kvpress_scores.pt")
KVzipPress.compress_post = post
m.main()
