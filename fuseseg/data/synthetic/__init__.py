"""Synthetic MSRS-like labelled infrared/visible street scenes.

``fuseseg`` must run on a fresh machine without a download, so it renders its own labelled
data set in the MSRS layout::

    OUT/{train,test}/{ir,vi,Segmentation_labels}/00001D.png, 00002N.png, ...

ir: (H, W) uint8; vi: (H, W, 3) uint8 RGB (files are BGR PNGs, as OpenCV writes them);
labels: (H, W) uint8 class ids 0..8 in MSRS's order (:data:`CLASS_NAMES`). Names carry MSRS's
day/night suffix (``D``/``N``) and are numbered continuously across train, then test.

How a scene is made
-------------------
*Geometry.* A pinhole camera at height ``h_c`` (m) above a flat ground plane looks along the
road. A 3-D point (X lateral, Y up, Z depth, metres) projects to::

    u = c_x + f (X - X_cam) / Z,        v = v_h + f (h_c - Y) / Z

(``v_h`` the horizon row), so objects shrink as 1/Z. Every object (road, curbs, cars, people,
...) is a set of planar parts whose corners are projected and filled with OpenCV.

*One map, three images.* All parts are drawn, far to near (painter's algorithm), into one
``uint16`` *material map*: each part gets a material id whose row in a look-up table holds its
class id, instance id, temperature-like infrared level, visible albedo (linear RGB), emission
and texture gains. The label map, the instance map, the infrared and the visible image are then
all look-ups of that same map, so labels are exactly the visible pixels of each object and the
three outputs agree by construction (occluded pixels belong to the nearer object).

*Physics, so the modalities complement each other.*

- Infrared = temperature: people hottest (skin > clothes), cars warm with hot wheels and engine,
  lamp heads warm, sky cold; cones, bumps, bikes and painted lines within a few grey levels of the
  road they stand on; guardrail metal a little colder. Smooth (low-frequency texture only),
  blurred (sigma 0.7..1.2 px) with sensor noise (sigma 1.2..2.5 grey levels).
- Visible = albedo x illumination + emission, gamma-encoded (``255 * sqrt(lin)``), with
  fine and mid-scale texture. Day: bright sun. Night (about half the scenes): weak ambient light,
  pools of light under street lamps and in front of head-lights, glowing lamps, lit windows and
  car lights, strong sensor noise, mostly dark clothing.

So at night people stand out in infrared but hardly in visible, and cones and bumps (orange/
white, yellow/black) stand out in visible but hardly in infrared; :func:`measure_contrast`
measures this and the tests assert it.
"""
from fuseseg.data.synthetic.canvas import CLASS_IDS, CLASS_NAMES, KINDS, NUM_CLASSES, valid_zoom
from fuseseg.data.synthetic.dataset import make_synthetic, measure_contrast, object_contrast, scene_rng
from fuseseg.data.synthetic.render import render_scene

__all__ = ["CLASS_IDS", "CLASS_NAMES", "KINDS", "NUM_CLASSES", "make_synthetic", "measure_contrast",
           "object_contrast", "render_scene", "scene_rng", "valid_zoom"]
