import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN with every case the selector must handle: stem, body convs, a residual
    shortcut, a depthwise conv and a Linear head. Input 1x8x8."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.conv1 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.shortcut = nn.Conv2d(w, 2 * w, 1, stride=2, bias=False)
        self.dw = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False)
        self.pw = nn.Conv2d(2 * w, 2 * w, 1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.shortcut(x))
        x = torch.relu(self.pw(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    m = TinyNet()
    # non-trivial BatchNorm statistics so that equivalence tests mean something
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture
def tiny_file(tmp_path):
    """TinyNet saved as a state_dict, plus the .py file that defines the class."""
    src = tmp_path / "tinynet.py"
    import inspect

    src.write_text("import torch\nfrom torch import nn\n\n\n" + inspect.getsource(TinyNet))
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    return ckpt, src


def write_tiny_files(folder, num_classes: int = 10):
    """Write ``tinynet.py`` (the TinyNet class) and ``tiny.pt`` (a seeded state_dict) into ``folder``."""
    import inspect
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "tinynet.py"
    src.write_text("import torch\nfrom torch import nn\n\n\n" + inspect.getsource(TinyNet))
    torch.manual_seed(0)
    ckpt = folder / ("tiny.pt" if num_classes == 10 else f"tiny-{num_classes}classes.pt")
    torch.save(TinyNet(num_classes=num_classes).state_dict(), ckpt)
    return ckpt, src


@pytest.fixture(scope="module")
def tiny_file_module(tmp_path_factory):
    """Like ``tiny_file``, shared by the tests of one module (for artifacts built once per module)."""
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread while a module runs: the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def write_tiny():
    """``write_tiny_files`` for tests that need TinyNet saved with other settings (e.g. num_classes=5)."""
    return write_tiny_files
