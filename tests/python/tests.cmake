# The Python package (python/): every tests/python/test_*.py is one ctest entry, run by pytest
# through run.py with the test Python (NM_PYTHON, .venv under `make test`), against the
# package installed there (scripts/deps.sh --with-venv installs it; run.py refuses a stale one).
# A multi-process test needs a timeout (CMakeLists.txt, nm_mpi_timeout); its mpirun has its own, 60 s.
set(NM_TIMEOUT_pypkg_test_mpi 120)    # measured 8.2 s, 8.7 s
set(NM_TIMEOUT_pypkg_test_lowlevel_mpi 240) # three mpiruns of ~4 s and the reference run
file(GLOB NM_PYPKG_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/python/test_*.py)
foreach(src ${NM_PYPKG_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME pypkg_${name} COMMAND ${NM_PYTHON} ${CMAKE_SOURCE_DIR}/tests/python/run.py ${src}
           WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  # NM_PEAK_GFLOPS: the MFU denominator, given, so each Trainer skips its 0.25 s GEMM measurement.
  set_tests_properties(pypkg_${name} PROPERTIES LABELS "cpu;python" SKIP_RETURN_CODE 77
                       ENVIRONMENT "${NM_TEST_ENV};NM_PEAK_GFLOPS=100")
  nm_mpi_timeout(pypkg_${name} ${src})
endforeach()
