"""Data sets that timm opens, for the trainer: torchvision's (``torch/<name>``: CIFAR-10 and -100, MNIST,
ImageNet, Places365...), Hugging Face datasets (``hfds/<name>``: a Hub data set, or a local folder of parquet,
arrow or image files) and images in tar files (``tar``). All are indexed (map-style), so every sample keeps
the per-sample augmentation seed and a resumed run sees what the uninterrupted run saw. Timm's streaming
readers (``hfids/``, ``wds/``, ``tfds/``) yield samples in an order of their own and are refused.

Labels follow the data set's own class names (torchvision's ``classes``, a ``ClassLabel`` column's names, the
sorted values of a label column of strings or integers, the tars' folders or names); an evaluation split is
labelled by the training split's names, so a split that orders or lacks classes differently still scores
against the right ones.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from timm.data import create_dataset
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from ..data import CorruptDataError
from .config import ConfigError
from .images import read_image
from .labels import read_labels

PREFIXES = ("torch", "hfds")
STREAMING = ("hfids", "wds", "tfds")  # timm's iterable readers
# torchvision data sets timm's create_dataset builds (its 'folder' names: masksub's data.name=folder instead)
TORCH_TRAIN_OR_TEST = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist")  # split: train or test
TORCH_NAMES = (*TORCH_TRAIN_OR_TEST, "imagenet", "places365", "inaturalist", "inat")
EVAL_SPLITS = ("val", "validation", "valid", "test")  # the names of a Hugging Face evaluation split, by preference


def source(name: str) -> str:
    """``fashion_mnist``, ``folder``, ``tar``, ``torch`` or ``hfds``: which kind of data set ``data.name`` names, or a
    ConfigError saying what it may be."""
    if name in ("fashion_mnist", "folder", "tar"):
        return name
    prefix, _, rest = name.partition("/")
    prefix = prefix.lower()
    usage = (
        "data.name must be fashion_mnist, folder (<dir>/<split>/<class>/<image>), tar (<dir>/<split>.tar, a folder "
        "of tars or a tar of tars), torch/<name> (torchvision: "
        f"{', '.join(TORCH_NAMES[:-1])}) or hfds/<name> (Hugging Face datasets: a Hub name or a local folder)"
    )
    if prefix in STREAMING:
        raise ConfigError(
            f"data.name={name!r}: timm's streaming readers ({', '.join(p + '/' for p in STREAMING)}) give samples in "
            "an order of their own, which the trainer's per-sample seeds and mid-epoch resume cannot follow; "
            "use hfds/ (the same Hugging Face data set, indexed; a folder of WebDataset shards too: hfds/<folder>, "
            "the datasets package indexes them) or an image folder. " + usage
        )
    if prefix == "torch" and rest.lower() not in TORCH_NAMES:
        raise ConfigError(f"data.name={name!r} is not a torchvision data set timm builds; {usage}")
    if prefix not in PREFIXES or not rest:
        raise ConfigError(f"{usage}; got {name!r}")
    return prefix


def _relabel(names: list[str], classes: list[str] | None, where: str) -> tuple[list[str], list[int] | None]:
    """The class names by label and, given the training split's ``classes``, this split's label -> theirs
    (None where they are the same)."""
    if classes is None or list(classes) == names:
        return names, None
    index = {c: i for i, c in enumerate(classes)}
    if extra := [n for n in names if n not in index]:
        raise ConfigError(
            f"{where} has {len(extra)} class(es) that the training split lacks ({', '.join(extra[:5])}"
            f"{', ...' if len(extra) > 5 else ''}): the model cannot predict them"
        )
    return list(classes), [index[n] for n in names]


class _Named(Dataset):
    """A data set read by ``self._item(row)``, its rows a subset spread over it, its labels mapped by ``_relabel``."""

    rows: list[int]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _label(self, target) -> int:
        target = self._to_index[target] if self._to_index is not None else int(target)
        return target if self.labels is None else self.labels[target]

    def _classes(self, names: list[str], classes: list[str] | None, where: str, to_index: dict | None = None):
        self._to_index = to_index  # label values (strings, sparse ints) -> this split's index
        self.classes, self.labels = _relabel(names, classes, where)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)


def spread_subset(count: int, subset: int | None) -> list[int]:
    """``subset`` indices spread evenly over ``count`` samples (in class order, an image folder's): every class
    keeps its share (the first ``subset`` would hold the first classes only)."""
    if not subset or subset >= count:
        return list(range(count))
    return [i * count // subset for i in range(subset)]


class TorchVision(_Named):
    """A torchvision data set (``torch/cifar10``...) from ``root``, as timm's ``create_dataset`` builds it."""

    def __init__(
        self, name: str, root: str | None, split: str, in_chans: int, subset=None, classes=None, download=False
    ):
        if not root:
            raise ConfigError(
                f"data.name={name} needs data.dir: the folder torchvision keeps it in (with data.download=true it "
                "downloads it there)"
            )
        try:
            self.base = create_dataset(name, root=root, split=split, download=download)
        except RuntimeError as e:  # torchvision's 'Dataset not found or corrupted', 'archive ... not present'
            fetch = "" if name.lower().endswith("imagenet") else ", or set data.download=true to download it there"
            raise FileNotFoundError(
                f"{name} (split {split}) could not be read from {root}: {e}. Point data.dir at the folder torchvision "
                f"downloaded it to{fetch}"
            ) from e
        names = getattr(self.base, "classes", None) or getattr(self.base, "all_categories", None) or []
        names = [c[0] if isinstance(c, tuple) else str(c) for c in names]  # ImageNet's: tuples of synonyms
        self.mode = "RGB" if in_chans == 3 else "L"
        basic = name.partition("/")[2].lower() in TORCH_TRAIN_OR_TEST
        shown = ("train" if split in ("train", "training") else "test") if basic else split
        self.description = f"{name} split {shown}"  # timm reads those six's splits as train or test
        self.rows = spread_subset(len(self.base), subset)
        self._classes(names, classes, self.description)

    def __getitem__(self, index: int):
        img, target = self.base[self.rows[index]]
        return img.convert(self.mode), self._label(target)


def _load(path: str, split: str, cache: str | None):
    """A split of the Hugging Face data set at ``path``: a Hub name or a folder ``load_dataset`` reads (parquet, arrow,
    csv or image files), or a folder ``DatasetDict.save_to_disk`` wrote."""
    import datasets

    if (Path(path) / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(path)
        if split not in saved:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(saved)}.')
        return saved[split]
    return datasets.load_dataset(path, split=split, cache_dir=cache)


def _eval_split(path: str, split: str) -> str:
    """``split``, or for an evaluation split the data set lacks (``val``, the default) the first of
    ``EVAL_SPLITS`` it has: Hugging Face data sets name theirs ``validation`` or ``test``."""
    if split not in EVAL_SPLITS:
        return split
    import datasets

    try:
        if (Path(path) / "dataset_dict.json").is_file():
            names = list(datasets.load_from_disk(path))
        else:
            names = datasets.get_dataset_split_names(path)
    except Exception:  # unreachable or unreadable: loading it reports why
        return split
    return split if split in names else next((s for s in EVAL_SPLITS if s in names), split)


class _Files(_Named):
    """Images decoded here from the files ``_open(row)`` gives (with their label and a name to report): an unreadable
    one is skipped, the next row standing in, or refused (``data.corrupt``)."""

    corrupt: str
    mode: str
    reported: set[str]

    def _open(self, row: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.rows):  # iteration ends here, and a wrong index is not taken for another
            raise IndexError(f"index {index} is out of range for {len(self.rows)} images")
        for attempt in range(len(self.rows)):
            file, target, name = self._open(self.rows[(index + attempt) % len(self.rows)])
            img = read_image(file, name, self.corrupt, self.reported)
            if img is not None:
                return img.convert(self.mode), self._label(target)
        raise RuntimeError(f"no readable image in the {len(self.rows)} images of {self.description}")


class HfDataset(_Files):
    """A Hugging Face data set's split (``hfds/<name>``, loaded by ``datasets.load_dataset``): its image column (decoded
    here, unreadable ones skipped or refused as in image folders) and its label column."""

    def __init__(
        self,
        name: str,
        root: str | None,
        split: str,
        in_chans: int,
        subset: int | None = None,
        classes: list[str] | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        corrupt: str = "skip",
    ):
        try:
            import datasets
        except ImportError as e:
            raise ConfigError(
                f"data.name={name} reads Hugging Face data sets, which needs their package: pip install datasets "
                "(or masksub's [data] extra)"
            ) from e
        split = _eval_split(name.partition("/")[2], split)
        where = self.description = f"{name} split {split}"
        try:
            table = _load(name.partition("/")[2], split, root)
        except ConnectionError as e:
            raise FileNotFoundError(
                f"{where}: {e}. Without the Hub, give a local copy: data.name=hfds/<folder> (parquet, arrow, csv "
                "or image files, or a folder save_to_disk wrote)"
            ) from e
        except ValueError as e:  # an unknown split or column
            raise ConfigError(
                f"{where}: {str(e).rstrip('.')} (data.train_split and data.val_split name its splits)"
            ) from e
        for kind, key in (("image", image_key), ("label", label_key)):
            if key is not None and key not in table.column_names:
                raise ConfigError(
                    f"{where} has no {kind} column {key!r} (its columns: {', '.join(table.column_names)}): "
                    f"set data.{kind}_key"
                )
        names, to_index = self._label_names(table, label_key, where)
        self.corrupt = corrupt
        self.mode = "RGB" if in_chans == 3 else "L"
        table = table.select_columns([k for k in (image_key, label_key) if k is not None])  # a row reads these only
        self.table = table.cast_column(image_key, datasets.Image(decode=False))  # decoded here: skipped if broken
        self.image_key, self.label_key = image_key, label_key
        self.rows = spread_subset(len(table), subset)
        self.reported: set[str] = set()
        self._classes(names, classes, where, to_index)

    @staticmethod
    def _label_names(table, label_key: str | None, where: str) -> tuple[list[str], dict | None]:
        """The class names by label, and the label values -> their index where the values are not the index."""
        if label_key is None:  # unlabelled (pretraining reads no labels): every image's label is 0
            return [], {None: 0}
        names = list(getattr(table.features[label_key], "names", None) or ())  # a ClassLabel's, by label
        values = table.unique(label_key)
        if names:
            if unlabelled := [v for v in values if not 0 <= v < len(names)]:
                raise ConfigError(
                    f"{where} has rows labelled {unlabelled[0]}, outside its {len(names)} classes (unlabelled, as "
                    "test splits often are): evaluate on a labelled split (data.val_split)"
                )
            return names, None
        if odd := [v for v in values if not isinstance(v, (int, str))]:  # plain values: their sorted distinct values
            raise ConfigError(
                f"{where}: label column {label_key!r} holds {odd[0]!r} ({type(odd[0]).__name__}), not a class: "
                "masksub trains single-label classifiers on a ClassLabel, string or integer column"
            )
        values = sorted(values, key=lambda v: natural_key(str(v)))
        return [str(v) for v in values], {v: i for i, v in enumerate(values)}

    def _open(self, row: int):
        where = f"{self.description} row {row}"
        try:
            item = self.table[row]
        except Exception as e:
            raise RuntimeError(f"{where} could not be read: {e}") from e
        image = item[self.image_key]
        label = item[self.label_key] if self.label_key is not None else None
        if image and image.get("bytes"):
            file = io.BytesIO(image["bytes"])
        else:  # a file named by path, or an empty cell (unreadable)
            file = image["path"] if image and image.get("path") else io.BytesIO()
        return file, label, where


def _tar_root(folder: str | None, split: str) -> str:
    """``<folder>/<split>`` if it is a .tar file or a folder holding .tar files, else ``<folder>/<split>.tar``."""
    if not folder:
        raise ConfigError("data.name=tar needs data.dir (the folder holding the splits' .tar files)")
    base = Path(folder).expanduser()
    given, named = base / split, base / f"{split}.tar"
    if given.is_file() and given.suffix.lower() == ".tar":
        return str(given)
    if given.is_dir() and any(given.glob("*.tar")):
        return str(given)
    if named.is_file():
        return str(named)
    raise FileNotFoundError(
        f"no tar for split {split!r}: data.name=tar reads {given}, a .tar file or a folder of .tar files, or {named}; "
        "name yours with data.train_split / data.val_split (e.g. --data.train_split ILSVRC2012_img_train.tar)"
    )


class TarImages(_Files):
    """Images inside tar files, read in place by timm's tar reader (``data.name=tar``): one tar of
    ``<class>/<image>`` files, a folder of tars (one per class, named by it), or a tar of such tars (ImageNet's
    training archive). An image's class is the folder or inner tar it lies in, or, given ``labels`` (a file,
    ``read_labels``) and the training split's ``classes``, the one that file gives (a flat tar: ImageNet's validation
    archive)."""

    def __init__(
        self,
        folder: str | None,
        split: str,
        in_chans: int,
        subset=None,
        classes=None,
        corrupt: str = "skip",
        labels: str | None = None,
    ):
        import tarfile

        from timm.data.readers.reader_image_in_tar import ReaderImageInTar

        root = _tar_root(folder, split)
        try:
            # timm writes an index of tars above 10 GB beside them, for the next run; not where it may not write
            writable = os.access(root if os.path.isdir(root) else os.path.dirname(root), os.W_OK)
            self.reader = ReaderImageInTar(root, cache_tarinfo=None if writable else False)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CorruptDataError(f"cannot read the tar file(s) of {root}: {e}; fix or replace them") from e
        except (AssertionError, ValueError) as e:  # no images in it: zip() of nothing
            raise FileNotFoundError(f"no images found in the tar file(s) of {root} ({e or 'empty'})") from e
        names = sorted(self.reader.class_name_to_idx, key=self.reader.class_name_to_idx.get)
        self.description, self.corrupt = root, corrupt
        self.mode = "RGB" if in_chans == 3 else "L"
        self.rows = spread_subset(len(self.reader), subset)  # the reader sorts by path: classes in order
        self.reported: set[str] = set()
        self._pid = None  # the process whose open tar files the reader holds: a forked worker opens its own
        self.from_file = None  # the label of each image, from data.val_labels
        if labels is not None:
            if len(names) > 1:
                raise ConfigError(
                    f"the images of {root} lie in {len(names)} folders or tars, which label them; data.val_labels "
                    "labels a tar of images without them: unset it"
                )
            images = [self.reader.filename(i) for i in range(len(self.reader))]
            self.from_file, names = read_labels(labels, images, list(classes), root), list(classes)
        self._classes(names, classes, root)

    def _open(self, row: int):
        if self._pid != os.getpid():  # open files shared with the parent would share its read position
            self._forget_open_files()
        file, target = self.reader[row]
        target = target if self.from_file is None else self.from_file[row]
        return file, target, f"{self.description}:{self.reader.filename(row)}"

    def __getstate__(self) -> dict:
        self._forget_open_files()  # open files do not pickle (a spawned worker gets a copy): each process opens its own
        return self.__dict__.copy()

    def _forget_open_files(self) -> None:
        states = [self.reader.tar_state] if self.reader.root_is_tar else list(self.reader.tar_state.values())
        for state in states:
            state.reset()
            for child in state.children.values():
                child.reset()
        self._pid = os.getpid()
