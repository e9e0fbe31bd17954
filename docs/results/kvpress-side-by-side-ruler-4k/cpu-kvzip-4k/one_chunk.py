import runpy, sys
sys.argv = ["kvpress_side_by_side.py"] + sys.argv[1:]
import importlib.util
spec = importlib.util.spec_from_file_location("sbs", "scripts/gpu/kvpress_side_by_side.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
m.PRESSES["kvzip"] = lambda r: m.KVzipPress(compression_ratio=r, chunk_size=8192)
m.main()
