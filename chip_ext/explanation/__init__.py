"""Explanation: CHIP maps and their variants (`explain`, `image_chip`), the shared machinery
(`maps`), the baselines and pytorch-grad-cam peers, the pytorch-grad-cam-style classes (`cam`) and
rendering (`render`)."""
