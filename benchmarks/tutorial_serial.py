"""The tutorial's analysis as a plain serial script: the baseline a user replaces.

What a beamline scientist would write from the tutorial (RingData's
``InterpSimple`` and ``DiffCorr``, in Python 3): open the run with h5py,
read each tag's image in turn, gather the nearest pixel of every polar bin
of the q band, multiply by the polar mask, normalise each row by its masked
mean, subtract consecutive bright shots, autocorrelate each difference
along phi with an rfft, average over pairs, divide by the mask's own
autocorrelation and save the result. Two slips of the tutorial are fixed
(nphi from the outer radius in pixels, the mean over pairs only), and each
image is processed as it is read instead of first stacking every polar
image, which only makes this baseline faster than the tutorial.

Run as a command, exactly as ``benchmarks/bench_command.py`` times it::

    python benchmarks/tutorial_serial.py RUN.h5 --center 1200 1200 \\
        --radii 745 785 --out corr.npy [--tags N] [--mask mask.npy]
"""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np
import numpy.ma as ma


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="DataConvert HDF5 file")
    p.add_argument("--center", nargs=2, type=float, required=True, metavar=("X", "Y"),
                   help="beam centre, pixels")
    p.add_argument("--radii", nargs=2, type=float, required=True, metavar=("RMIN", "RMAX"),
                   help="inner and outer radius of the band, pixels")
    p.add_argument("--tags", type=int, default=None, help="process the first N tags only")
    p.add_argument("--mask", default=None, help="pixel mask .npy, 1 = good")
    p.add_argument("--out", required=True, help="correlation (nq, nphi) .npy")
    args = p.parse_args()
    t0 = time.perf_counter()

    fh5 = h5py.File(args.run, "r")
    run_number = int(fh5["file_info/run_number_list"][0])
    event = fh5[f"run_{run_number}/event_info"]
    tags = event["tag_number_list"][()]
    bright = event["bl_3/eh_1/xfel_pulse_selector_status"][()].astype(bool)
    if args.tags is not None:
        tags, bright = tags[:args.tags], bright[:args.tags]
    imgs_path = f"/run_{run_number}/detector_2d_assembled_1"
    shape = fh5[f"{imgs_path}/tag_{tags[0]}/detector_data"].shape
    mask = (np.load(args.mask).astype(np.float32) if args.mask
            else np.ones(shape, dtype=np.float32))
    ny, nx = shape

    # -- InterpSimple(x_c, y_c, qmax_pix, qmin_pix, nphi, raw_img_shape)
    x_c, y_c = args.center
    r_in, r_out = args.radii
    nphi = int(2 * np.pi * r_out)  # one pixel of arc at the outer radius
    phis = np.arange(nphi) * 2 * np.pi / nphi
    q_rows = np.arange(r_in, r_out)
    Q = np.vstack([np.ones(nphi) * iq for iq in q_rows])
    PHI = np.vstack([phis for _ in q_rows])
    xring = Q * np.cos(PHI - np.pi) + x_c
    yring = Q * np.sin(PHI - np.pi) + y_c
    xnear = xring.astype(int) + np.round(xring - np.floor(xring)).astype(int)
    ynear = yring.astype(int) + np.round(yring - np.floor(yring)).astype(int)
    indices_1d = nx * ynear + xnear

    def nearest(img: np.ndarray) -> np.ndarray:
        return img.ravel()[indices_1d]

    pmask = nearest(mask).round()
    fm = np.fft.rfft(pmask, n=nphi, axis=-1)
    mask_ac = np.rint(np.fft.irfft(fm * np.conjugate(fm), n=nphi, axis=-1))

    img_gen = (fh5[f"{imgs_path}/tag_{t}/detector_data"][()] for t in tags)
    total = np.zeros((q_rows.size, nphi))
    npairs = 0
    prev = None
    for i in range(len(tags)):
        polar = pmask * nearest(next(img_gen))
        norms = ma.masked_equal(polar, 0).mean(axis=1)  # normalize_polar_images(mask_val=0)
        polar /= np.asarray(norms.filled(1.0))[:, None]
        polar[polar < 0] = 0
        if prev is not None and bright[i] and bright[i - 1]:
            diff = prev - polar  # shot A - shot B, consecutive exposures
            fx = np.fft.rfft(diff, n=nphi, axis=-1)  # DiffCorr._fft_autocorr
            total += np.fft.irfft(fx * np.conjugate(fx), n=nphi, axis=-1)
            npairs += 1
        prev = polar
    fh5.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(mask_ac > 0, total / max(npairs, 1) / mask_ac, 0.0)
    np.save(args.out, corr)
    print(f"wrote {args.out}: {len(tags)} tags, {npairs} pairs, corr {corr.shape} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
