"""Stand-in for the PyTorch extension's PyTorchUtils module (see README.md): records install calls.

Mimics PyTorchUtils/PyTorchUtils.py of fepegar/SlicerPyTorch: `installTorch` runs light-the-torch and
ends with `import torch` (so it loads torch into the calling process); `_getPipInstallArguments` builds
the light-the-torch arguments; `_installLightTheTorch` pip-installs light-the-torch."""

calls: list = []
installs_succeed = True


class PyTorchUtilsLogic:
    @staticmethod
    def torchInstalled() -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
        if not installs_succeed:
            return None
        import torch  # as the real one does after installing

        return torch

    @staticmethod
    def _getPipInstallArguments(forceComputationBackend=None, torchVersionRequirement=None,
                                torchvisionVersionRequirement=None):
        args = ["install", "torch" + (torchVersionRequirement or ""),
                "torchvision" + (torchvisionVersionRequirement or "")]
        if forceComputationBackend is not None:
            args.append(f"--pytorch-computation-backend={forceComputationBackend}")
        return args

    @staticmethod
    def _installLightTheTorch():
        import slicer

        slicer.util.pip_install("light-the-torch>=0.5")
