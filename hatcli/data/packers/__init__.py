"""The packers that ship with hat: `imagenet` (any class-per-folder tree), `coco`, `mnist`."""
