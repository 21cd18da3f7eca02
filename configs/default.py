"""Embedded default: synthetic faces, x8, a SPADNet small enough for a 2-core CPU.

python train.py trains it in about ten minutes on such a machine; every field can be
overridden on the command line, e.g. --config.batch_size=16 --config.model.n_feats=32.
`python train.py --help` lists the fields with the comments below.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                        # parameter initialisation and data order

  c.model = ml_collections.ConfigDict()
  c.model.scale = 8                 # upscaling factor: 4, 8 or 16 (16, 32 or 64 px LR faces)
  c.model.n_feats = 16              # feature channels (the paper: 64)
  c.model.number = 2                # residual blocks per stage and branch (the paper: 6)
  c.model.hab_num = placeholder(int)  # attention blocks per stage (None: number - 1)
  c.model.reduction = 4             # channel-attention reduction (the paper: 16)
  c.model.pac_kernel = "gaussian"   # registered LSAC kernel (ops.KERNELS): gaussian, inverse
  c.model.pac_impl = "auto"         # registered PAC formulation (ops.PAC_IMPLS); same outputs
  c.model.conv_impl = "winograd"    # 3x3 conv formulation (ops.CONV_IMPLS): winograd or xla
  c.model.gsac_gate = "official"    # GSAC gate layout: official (repeat+reshape) or channel
  c.model.use_lsac = True           # the local (pixel-adaptive) path of every HAB
  c.model.use_gsac = True           # the global gate path of every HAB
  c.model.heatmap_branch = True     # predict heatmaps and guide the HABs with them
  c.model.remat = "none"            # recompute in the backward pass: none, rcab or all
  c.model.dtype = "float32"         # computation dtype: float32 or bfloat16 (params stay f32)

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_faces"   # registered data source (data.sources), e.g. face_folder/celeba
  c.data.data_dir = ""              # where tfds data sets are built ('': ~/tensorflow_datasets)
  c.data.manual_dir = ""            # face_folder: the prepared HR/ + landmark.pkl folders
  c.data.train_split = "train"      # split trained on
  c.data.eval_split = "test"        # split validated and finally evaluated on
  c.data.lr_kernel = "pil"          # LR synthesis: pil (Pillow bicubic, 8-bit) or matlab
  c.data.augment_flip = True        # random horizontal flips (landmarks relabelled)
  c.data.augment_rot90 = False      # random multiples of 90 degrees
  c.data.skip_bad_examples = False  # face_folder: skip unreadable or bad files (counted)
  c.data.max_image_pixels = 100_000_000  # face_folder: larger images refused from their header
  c.data.num_threads = 2            # grain reader threads
  c.data.prefetch = 4               # batches prepared ahead

  c.batch_size = 8                  # global batch, split over devices and processes
  c.num_train_steps = 1500          # steps to train; > 0 wins over num_epochs
  c.num_epochs = 0.0                # epochs to train when num_train_steps <= 0
  # Loss terms (spadnet_jax.losses) and their weights; 0 leaves a term out. This default
  # differs from the paper (sr_l1 + heatmap_l1, kept by configs/celeba_x8.py and the other
  # paper configs): under L1 the heatmap branch of this small model learns all-zero
  # heatmaps (L1's optimum for a mostly-zero target; NME 1.49 after 1,500 steps), under
  # peak-weighted squared error it learns the landmarks (NME 0.04) and PSNR-Y holds.
  c.loss = ml_collections.ConfigDict()
  c.loss.sr_l1 = 1.0                # L1 of the SR image (the paper's)
  c.loss.heatmap_l1 = 0.0           # L1 of the heatmaps (the paper's)
  c.loss.heatmap_l2 = 0.0           # squared error of the heatmaps (DIC's)
  c.loss.heatmap_peak_l2 = 1.0      # squared error weighted towards the landmarks' peaks
  c.heatmap_loss_weight = 1.0       # scales every heatmap_* term (older configurations' field)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # Adam's initial learning rate
  c.optimizer.b1 = 0.9              # Adam beta1
  c.optimizer.b2 = 0.99             # Adam beta2
  c.optimizer.eps = 1e-8            # Adam epsilon
  c.optimizer.decay_epochs = (3.0, 4.0)  # epochs at which the learning rate is multiplied...
  c.optimizer.decay_factor = 0.5    # ...by this factor
  c.optimizer.grad_clip = 0.0       # global-norm gradient clipping (0: off)
  c.optimizer.ema_decay = 0.0       # EMA of the weights, served by checkpoints (0: off)

  c.fsdp = 1                        # devices per parameter shard (1: pure data parallel)
  c.partition_rules = ()            # ((regex, PartitionSpec tuple | 'fsdp_auto'), ...)
  c.nonfinite = "stop"              # a non-finite update: stop, or skip it and count it
  c.max_skipped_fraction = 0.01     # nonfinite='skip': a run that skipped more fails at the end
  c.preemption_sync_every = 10      # steps between the processes' stop-flag agreement
  c.log_every = 50                  # steps between progress lines
  c.eval_every = 500                # steps between validations (and checkpoints)
  c.checkpoint_every = 500          # steps between checkpoints
  c.keep_checkpoints = 2            # newest checkpoints kept (plus the best by PSNR-Y)
  c.async_checkpoints = True        # write checkpoints while training goes on
  c.eval_batch_size = 20            # global evaluation batch
  c.num_eval_images = 100           # images per validation; the final one uses the whole split
  c.num_grid_images = 4             # faces in each validation's comparison grid
  c.metric_score = "float"          # score the float output (official) or the 8-bit png
  c.profile_steps = 0               # steps to trace with jax.profiler (0: none)
  return c
