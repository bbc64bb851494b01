"""The output shapes users script against, written out once for every test that checks them.

They are the contract (the seed's JSON record, the CSV export's header), so tests compare the
code's output with these literals rather than with the code's own constants.
"""

from __future__ import annotations

#: The seed's per-image record (README.ru.md): every result item carries at least these.
SEED_KEYS = frozenset(
    ["image_path", "predicted_class", "predicted_emotion", "confidence", "all_probabilities"]
)
#: What results add for faces: how many were found, the image's size (the boxes' frame), and
#: every face (box, score, landmarks, prediction), largest first.
FACE_KEYS = frozenset(["faces_found", "image_size", "faces"])
#: ``GET /api/v1/jobs/<id>/results?format=csv``: one row per face, one column per emotion, in the
#: model's order. A header line as a spreadsheet shows it, split into columns.
CSV_HEADER = (  # noqa: SIM905
    "image_path,status,face_index,faces_found,whole_image,box_x0,box_y0,box_x1,box_y1,"
    "face_score,predicted_class,predicted_emotion,confidence,"
    "Angry,Fear,Happy,Sad,Surprised,model_version,error"
).split(",")
