# mpirun.sh: sourced by the multi-process tests. nm_mpirun N CMD... runs CMD on N ranks with
# Debian's OpenMPI on however few cores there are (--oversubscribe), as root too (CI runs as
# root: OpenMPI refuses that unless told), one OpenMP thread per rank, output tagged by rank.
command -v mpirun >/dev/null || { echo "SKIP: mpirun not found (apt-get install openmpi-bin)"; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# No network probing inside containers: loopback and shared memory are all a test needs.
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_plm_rsh_agent=false
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
nm_mpirun() {
  local n=$1; shift
  mpirun --oversubscribe -np "$n" -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive "$@"
}
