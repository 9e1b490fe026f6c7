"""Stand-in for the `vtk` module: the names UniversalSeg uses (see README.md)."""


class vtkCommand:
    """Mimics VTK Common/Core/vtkCommand (event ids)."""

    ModifiedEvent = 33


class vtkStringArray:
    """Mimics VTK Common/Core/vtkStringArray."""

    def __init__(self):
        self.values: list[str] = []

    def InsertNextValue(self, value: str) -> int:
        self.values.append(str(value))
        return len(self.values) - 1

    def GetNumberOfValues(self) -> int:
        return len(self.values)

    def GetValue(self, index: int) -> str:
        return self.values[index]


class reference:
    """vtk.reference (VTK's Python wrapping of a non-const reference argument, e.g. vtkSegment::GetTag)."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value

    def set(self, value) -> None:
        self._value = value
