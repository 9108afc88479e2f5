"""What a learner sees: JupyterLab in a real browser (Debian's chromium, driven by selenium), on copies of
notebooks 02 and 03, through the real menus and controls.

Each copy is the notebook cut to the cells its widget needs (``notebook_cells.slice_for``: the setup and
doctor cells, the widget's cell and every earlier cell that binds a name it reads, in turn): Run All
then runs what the widget depends on, as in the whole notebook, in a third of the time. nbval runs the
whole notebooks (``make test``); this test is about the browser.

1. Opened, before anything runs, the memory calculator shows as controls (the saved widget state), not as
   ``VBox(children=...`` text. JupyterLab renders saved widgets only in a trusted notebook; ``make lab``
   trusts the kit's notebooks (``jupyter trust``), and so does this test.
2. Run > Run All Cells: the first code cells (setup, environment doctor) write nothing to stderr.
3. Choosing another model in the calculator's dropdown changes the plan it prints.

On failure a screenshot goes to ``build/browser/``. Needs chromium and chromedriver: ``make test``
installs them on Debian as root (``make browser-deps``); elsewhere the test is skipped and says why.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from notebook_cells import code_cells, slice_for

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "03_double_quant_memory.ipynb"
EXPLORER = "02_nf4_quantiles.ipynb"
WIDGETS = {NOTEBOOK: "W.Dropdown(options=list(M.KNOWN_CONFIGS)", EXPLORER: "widgets.interactive(explore"}
SHOTS = ROOT / "build" / "browser"


def sliced_copy(name: str, dest: Path) -> list[int]:
    """Write notebook ``name`` cut to the code cells its widget (``WIDGETS[name]``) needs, outputs and
    saved widget state kept, execution counts cleared; return the kept cells' indices.

    The counts go because ``_run_all`` knows a cell has run by its prompt showing a count: a saved ``[5]:``
    would say so before Run All has reached the cell."""
    path = ROOT / "notebooks" / name
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    target = next((i for i, src in enumerate(code_cells(path)) if WIDGETS[name] in src), None)
    assert target is not None, f"{name}: no cell contains {WIDGETS[name]!r}; update WIDGETS"
    keep = slice_for(path, target)
    nb["cells"] = [{**code[i], "execution_count": None} for i in keep]
    dest.write_text(json.dumps(nb, indent=1))
    return keep


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed: run `make browser-deps` (Debian: apt-get install chromium "
                    f"chromium-driver) to run the browser test")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on trusted, cut copies of notebooks 02 and 03 (autosave never touches the kit's own files),
    with a workspace and settings of its own.

    JupyterLab reopens the tabs its workspace saved (``~/.jupyter/lab/workspaces``): an earlier run of this
    test left both notebooks open there, so the next run started two kernels at once and Run All could go to
    the tab restored as current; notebook 03's calculator then answered nothing (failed 1 run in 3 on this
    machine, 2026-12-06, and in CI). A fresh workspace directory makes every run start from the same layout."""
    _need("chromium"), _need("chromedriver")
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    cells = {name: len(sliced_copy(name, root / "notebooks" / name)) for name in (NOTEBOOK, EXPLORER)}
    jupyter = Path(sys.executable).parent / "jupyter"
    # a trust database of its own: what this machine trusted before cannot make the test pass
    env = {**os.environ, "QLORA_KIT_FIGURES": str(root / "figures"), "JUPYTER_DATA_DIR": str(root / "jupyter-data")}
    subprocess.run([str(jupyter), "trust", str(root / "notebooks" / NOTEBOOK), str(root / "notebooks" / EXPLORER)],
                   check=True, capture_output=True, env=env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}", f"--LabApp.user_settings_dir={root / 'settings'}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/lab", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not answer within 60 s")
    yield url, cells
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = _need("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_need("chromedriver")), options=opts)
    yield driver
    driver.quit()


def _alone(lab: str, name: str) -> str:
    """The address that opens notebook ``name`` in a workspace of its own, reset: the only notebook on the
    page, so the menus, prompts and widgets the tests read are its own."""
    return f"{lab}/lab/workspaces/{Path(name).stem.replace('_', '-')}/tree/notebooks/{name}?reset"


def _run_all(browser, cells: int, seconds=300):
    """Wait, as a learner does, for the status bar to say the kernel is idle; then Run > Run All Cells through
    the menu, and wait until each of the notebook's ``cells`` code cells shows an execution count.

    A prompt's count says the cell ran only because the copies' saved counts are cleared (``sliced_copy``)
    and the notebook is alone on the page (``_alone``): with a saved ``[5]:``, or another notebook's prompts
    on the page, this wait could end before Run All reached the widget, and the test then spoke to the
    saved, disconnected copy of the calculator (2026-12-06: ``.jupyter-widgets-disconnected``, no answer)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 120, poll_frequency=0.5).until(lambda b: any(
        "Idle" in e.get_attribute("textContent") for e in b.find_elements(By.CSS_SELECTOR, ".jp-StatusBar-TextItem")))
    browser.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "li[data-command='runmenu:run-all']"))
    browser.find_element(By.CSS_SELECTOR, "li[data-command='runmenu:run-all']").click()

    def all_ran(b):   # every code cell's prompt shows an execution count (textContent: cells off screen too)
        prompts = [p.get_attribute("textContent").strip() for p in b.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
        assert len(prompts) <= cells, f"{len(prompts)} code cells on the page, the notebook has {cells}"
        return len(prompts) == cells and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
    WebDriverWait(browser, seconds, poll_frequency=1).until(all_ran)
    errors = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert not errors, f"a cell failed in the browser: {errors[0].get_attribute('textContent')[:300]}"


def test_the_nf4_explorer_draws_what_is_chosen(lab, browser, request):
    """Notebook 02 §7: choose a distribution and a blocksize, press Draw: the three plots change."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def images():
        return [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, ".widget-output img")]

    try:
        url, cells = lab
        browser.get(_alone(url, EXPLORER))
        WebDriverWait(browser, 90).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".jupyter-widgets select"))
        _run_all(browser, cells[EXPLORER])
        select = next(s for s in browser.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
                      if "normal" in s.get_attribute("textContent"))
        draw = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button.jupyter-button")
                    if b.get_attribute("textContent").strip() == "Draw")
        browser.execute_script("arguments[0].scrollIntoView()", select)
        drawn = []
        for choice in ("normal", "model weights"):
            Select(select).select_by_visible_text(choice)
            draw.click()
            WebDriverWait(browser, 60).until(lambda b: images() and images() not in drawn)
            drawn.append(images())
        assert drawn[0] != drawn[1], "Draw with another distribution gave the same plots"
    except BaseException:
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / f"{request.node.name}.png"))
        raise


def test_the_calculator_shows_as_controls_then_answers_a_change(lab, browser, request):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def outputs_text():
        return " ".join(e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".widget-output"))

    def notebook_text():
        return browser.find_element(By.CSS_SELECTOR, ".jp-Notebook").get_attribute("textContent")

    try:
        url, cells = lab
        browser.get(_alone(url, NOTEBOOK))
        wait = WebDriverWait(browser, 90)
        # 1. opened, nothing run: the saved widgets render as controls
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".jupyter-widgets .widget-dropdown select")
                   or "VBox(children=" in notebook_text())
        assert "VBox(children=" not in notebook_text(), \
            "the calculator shows as Python text, not as controls: is the notebook trusted (jupyter trust)?"
        # 2. Run > Run All Cells, through the menu a learner uses
        _run_all(browser, cells[NOTEBOOK])
        first = browser.find_elements(By.CSS_SELECTOR, ".jp-CodeCell")[:2]        # setup cell, doctor cell
        stderr = [e.get_attribute("textContent") for c in first for e in c.find_elements(
            By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
        assert not stderr, f"the first screen shows stderr: {stderr}"
        # 3. a change in the calculator changes its answer
        before = outputs_text()
        assert "6,738,415,616 params" in before, before[:300]                  # llama-2-7b, the default
        select = next(s for s in browser.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
                      if "llama-65b" in s.get_attribute("textContent"))
        browser.execute_script("arguments[0].scrollIntoView()", select)
        Select(select).select_by_visible_text("llama-65b")
        # The output area is cleared before the new answer renders: wait for the answer, not for a change (an
        # empty area is a change; under load the check once read it there, 2026-12-06).
        wait.until(lambda b: "65,285,660,672 params" in outputs_text(),
                   "the calculator's answer did not change to llama-65b's (65,285,660,672 params) in 90 s")
    except BaseException:
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / f"{request.node.name}.png"))
        raise
