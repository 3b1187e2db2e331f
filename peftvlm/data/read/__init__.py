"""Reading data: sources (files, folders, `datasets`) and their layouts (row formats, COCO /
YOLO / VQAv2 annotations, JSON lists) into records, checked rows, images (`images.py`: the one
decoder every path uses) and video frames. Imports only the leaf modules `data.rows` and
`data.boxes`."""
