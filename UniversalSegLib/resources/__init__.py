"""Files shipped with the package: the bundled model(s) and the sample CT."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
SAMPLE_CT = RESOURCES / "sample" / "ct_abdomen.nii.gz"
SAMPLE_LABELS = RESOURCES / "sample" / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"
SAMPLE_LABEL_NAMES = RESOURCES / "sample" / "totalsegmentator_v2_label_names.json"
