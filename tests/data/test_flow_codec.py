"""Flow files and OpenCV's PNG codec when decord is in the same process (decord ships an older zlib)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import numpy as np
import decord  # before cv2: OpenCV's libpng then binds decord's zlib and writes damaged PNGs
import cv2
from pipeline.data.flow_files import FlowFolder, quantize

folder = FlowFolder(sys.argv[1])
flow = np.random.default_rng(0).normal(0, 2, size=(3, 2, 16, 16)).astype(np.float32)
probe = np.random.default_rng(0).integers(0, 255, size=(32, 16)).astype(np.uint8)
ok, png = cv2.imencode(".png", probe)
broken = cv2.imdecode(png, cv2.IMREAD_UNCHANGED) is None or not (cv2.imdecode(png, cv2.IMREAD_UNCHANGED) == probe).all()
try:
    folder.write_quantized("a.avi", quantize(flow, 20.0), 20.0)
except RuntimeError as err:
    print("refused:", err)
    sys.exit(0 if broken else 1)
print("written, codec broken:", broken)
sys.exit(1 if broken else 0)
"""


def test_a_broken_png_codec_refuses_instead_of_writing_damaged_files(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("decord")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "flows")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if "refused" in result.stdout:  # where the codec breaks, nothing damaged is left behind
        assert "decord was imported before cv2" in result.stdout
        assert not list((tmp_path / "flows").rglob("*.flow.zip"))
