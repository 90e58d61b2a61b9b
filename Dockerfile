# The image of k8s/ (KubeRay): Ray 2.60's image (Python 3.11, CUDA) with this package installed the same way
# as cluster.yaml's setup_commands and the Makefile: the package with its pins, then facenet-pytorch without
# its own (torch<2.3, numpy<2, Pillow<10.3).
#   docker build -t YOUR-REGISTRY/c3ae-ray:0.1.0 . && docker push YOUR-REGISTRY/c3ae-ray:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users pyproject.toml README.md /home/ray/c3ae_ray/
COPY --chown=ray:users c3ae_ray /home/ray/c3ae_ray/c3ae_ray
COPY --chown=ray:users jobs /home/ray/c3ae_ray/jobs
COPY --chown=ray:users serve /home/ray/c3ae_ray/serve
RUN pip install --no-cache-dir /home/ray/c3ae_ray \
 && pip install --no-cache-dir --no-deps facenet-pytorch==2.6.0
WORKDIR /home/ray/c3ae_ray
