"""Stand-in for the PyTorch extension's PyTorchUtils module (see README.md): records install calls."""

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
        return object() if installs_succeed else None
