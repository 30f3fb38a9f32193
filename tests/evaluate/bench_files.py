"""Small benchmark copies in the public file formats, written into a test's tmp_path."""

import base64
import csv
import io
import json
import os

from PIL import Image


def image_bytes(colour, size=(20, 12), fmt="PNG") -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format=fmt)
  return buffer.getvalue()


def save_image(path, colour, fmt="PNG", size=(20, 12)) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(image_bytes(colour, size, fmt))
  return str(path)


SQA_PROBLEMS = {
    "5": {"question": "Which is the hottest?", "choices": ["50°C", "50°F", "5°C"], "answer": 0,
          "hint": "Select the best estimate.", "image": "image.png", "task": "closed choice",
          "grade": "grade3", "subject": "natural science", "topic": "physics",
          "category": "Temperature", "skill": "estimate", "lecture": "", "solution": "",
          "split": "test"},
    "7": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1,
          "hint": "", "image": None, "subject": "language science", "split": "test"},
    "9": {"question": "Which state is this?", "choices": ["Ohio", "Utah"], "answer": 1,
          "hint": "", "image": "image.png", "subject": "social science", "split": "train"},
    "11": {"question": "Which country is highlighted?", "choices": ["Fiji", "Tonga"],
           "answer": 1, "hint": "", "image": "image.png", "subject": "social science",
           "split": "test"},
}


def write_scienceqa(root, problems=None) -> str:
  """problems.json, pid_splits.json; pid 5's image under images/test, pid 11's under test/."""
  problems = SQA_PROBLEMS if problems is None else problems
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "problems.json"), "w") as f:
    json.dump(problems, f, ensure_ascii=False)
  with open(os.path.join(root, "pid_splits.json"), "w") as f:
    json.dump({"train": ["9"], "val": [], "test": ["5", "7", "11"]}, f)
  save_image(os.path.join(root, "images", "test", "5", "image.png"), (200, 30, 30))
  save_image(os.path.join(root, "images", "train", "9", "image.png"), (30, 30, 200))
  save_image(os.path.join(root, "test", "11", "image.png"), (30, 200, 30), size=(16, 16))
  return str(root)


POPE_ADVERSARIAL = [
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a dining table in the image?", "label": "no"},
]
POPE_RANDOM = [
    {"question_id": 1, "image": "COCO_val2014_000000210789.jpg",
     "text": "Is there a person in the image?", "label": "yes", "category": "random"},
]


def write_pope(folder) -> tuple[str, str]:
  """coco_pope_adversarial.json (no category field) and coco_pope_random.json (with it), as
  JSON Lines; COCO images in folder/val2014. Returns (question folder, image folder)."""
  images = os.path.join(folder, "val2014")
  for name, records in (("coco_pope_adversarial.json", POPE_ADVERSARIAL),
                        ("coco_pope_random.json", POPE_RANDOM)):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    for r in records:
      save_image(os.path.join(images, r["image"]), (90, 90, 90), fmt="JPEG")
  return str(folder), images


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "l2-category", "image", "split", "source"]


def mmbench_rows() -> list[dict]:
  png = base64.b64encode(image_bytes((10, 120, 240))).decode()
  jpeg = base64.b64encode(image_bytes((240, 120, 10), fmt="JPEG")).decode()
  return [
      {"index": 0, "question": "What colour is the sky?", "hint": "nan", "A": "green",
       "B": "blue", "C": "red", "D": "black", "answer": "B",
       "category": "attribute_recognition", "l2-category": "finegrained_perception",
       "image": png, "split": "dev", "source": "MMBench"},
      {"index": 7, "question": "Which animal is it?",
       "hint": "The picture was taken at a farm.", "A": "cow", "B": "horse", "C": "sheep",
       "D": "", "answer": "C", "category": "object_localization",
       "l2-category": "finegrained_perception", "image": jpeg, "split": "dev",
       "source": "MMBench"},
  ]


def write_mmbench(path, rows=None, columns=MMBENCH_COLUMNS) -> str:
  """A TSV as pandas writes it (tab-separated, header first, NaN as 'nan' or empty)."""
  rows = mmbench_rows() if rows is None else rows
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


SEED_QUESTIONS = {
    "questions": [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three",
         "choice_d": "Four", "data_id": "1454426_2591111986.jpg", "data_type": "image",
         "question": "How many towels are in the image?", "question_id": "101669_0",
         "question_type_id": 5},
        {"answer": "D", "choice_a": "Pouring", "choice_b": "Cutting", "choice_c": "Washing",
         "choice_d": "Stirring", "data_id": "v_0001.mp4", "data_type": "video",
         "question": "What is the person doing?", "question_id": "v_1",
         "question_type_id": 10},
        {"answer": "C", "choice_a": "Sunny", "choice_b": "Rainy", "choice_c": "Snowy",
         "choice_d": "Foggy", "data_id": "2271_3311.jpg", "data_type": "image",
         "question": "What is the weather?", "question_id": "3",
         "question_type_id": 1},
    ],
    "question_type": {"Scene Understanding": 1, "Instance Counting": 5,
                      "Action Recognition": 10},
}


def write_seed(folder, content=None) -> str:
  """SEED-Bench.json and SEED-Bench-image/ in `folder`."""
  content = SEED_QUESTIONS if content is None else content
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "SEED-Bench.json"), "w") as f:
    json.dump(content, f)
  for q in content["questions"]:
    if q["data_type"] == "image":
      save_image(os.path.join(folder, "SEED-Bench-image", q["data_id"]), (5, 5, 5), fmt="JPEG")
  return str(folder)
