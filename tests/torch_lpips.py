"""A PyTorch LPIPS reference for the tests, written from the lpips package's code (v0.1, VGG):
torchvision's vgg16().features layout and key names, the ScalingLayer constants, unit
normalisation over channels, 1x1 linear heads without bias, spatial mean, sum over layers.
torchvision itself cannot be installed here, so the trunk is rebuilt with the same indices."""

import torch
from torch import nn

CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips' vgg16 slices end after relu1_2 ... relu5_3


def vgg16_features() -> nn.Sequential:
  layers, channels = [], 3
  for v in CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
      channels = v
  return nn.Sequential(*layers)


class NetLinLayer(nn.Module):
  def __init__(self, chn_in):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                       bias=False))

  def forward(self, x):
    return self.model(x)


class TorchLPIPS(nn.Module):
  def __init__(self):
    super().__init__()
    self.features = vgg16_features()
    for i, c in enumerate((64, 128, 256, 512, 512)):
      setattr(self, f"lin{i}", NetLinLayer(c))
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def forward(self, x, y):  # NCHW in [-1, 1] -> [B]
    def taps(inp):
      out, h, start = [], (inp - self.shift) / self.scale, 0
      for end in SLICE_ENDS:
        for layer in self.features[start:end]:
          h = layer(h)
        out.append(h)
        start = end
      return out

    total = 0
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
      a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
      b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
      total = total + getattr(self, f"lin{i}")((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1)


def random_lpips(seed: int = 0) -> TorchLPIPS:
  torch.manual_seed(seed)
  model = TorchLPIPS().eval()
  with torch.no_grad():
    for i in range(5):  # the learned heads are non-negative
      w = getattr(model, f"lin{i}").model[1].weight
      w.copy_(w.abs())
  return model
