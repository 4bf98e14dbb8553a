"""The HTML report in a real headless browser (Debian's chromium; `make test` installs it when absent)."""

import shutil
import subprocess

import numpy as np
import pytest

from peftlab.cli import main
from tests.test_lab import write

pytestmark = pytest.mark.browser


def screenshot(page, png, width: int = 1200, height: int = 1800) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)


def test_the_report_renders_in_a_headless_browser(toy_task, tmp_path):
    from matplotlib.image import imread

    path = write(tmp_path / "e.yaml", f"""
name: shot
defaults: {{model: tiny-gpt2, task: {toy_task}, epochs: 2, train_limit: 60, eval_limit: 40}}
grid: {{method: [head, lora, full]}}
""")
    assert main(["run", path, "--out", str(tmp_path / "exp")]) == 0
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "exp" / "report.html", png)
    img = imread(png)[..., :3]
    assert img.shape[:2] == (1800, 1200)
    ink = (img < 0.9).any(-1)  # pixels that are not (near) white: text, table lines, plots
    assert ink.mean() > 0.02, f"the screenshot is nearly blank ({ink.mean():.4f} of pixels inked)"
    colourful = (img.max(-1) - img.min(-1)) > 0.2  # the plots' coloured marks and bars
    assert colourful.mean() > 0.001
    assert np.unique(img.reshape(-1, 3), axis=0).shape[0] > 50
