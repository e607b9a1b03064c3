# tests/fuzz/tests.cmake: the libFuzzer target for the .idx parser, included by the top-level
# CMakeLists.txt. The project is built with the default C compiler; libFuzzer needs clang, so
# the target is compiled by a custom command straight from the few sources it needs
# (indexed.c and its dependencies). Without clang (or without its libFuzzer runtime) the test
# is still registered and reports itself skipped (exit 77).
find_program(NM_CLANG NAMES clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14)
set(NM_FUZZ_SOURCES ${CMAKE_SOURCE_DIR}/tests/fuzz/fuzz_indexed.c ${CMAKE_SOURCE_DIR}/src/data/indexed.c
                    ${CMAKE_SOURCE_DIR}/src/core/check.c ${CMAKE_SOURCE_DIR}/src/io/fileio.c)
set(NM_FUZZ_OK OFF)
if(NM_CLANG)
  # Probe once that clang links -fsanitize=fuzzer (the runtime is a separate package on some systems).
  set(_probe ${CMAKE_BINARY_DIR}/CMakeFiles/nm_fuzz_probe.c)
  file(WRITE ${_probe} "#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n")
  execute_process(COMMAND ${NM_CLANG} -fsanitize=fuzzer,address ${_probe} -o ${CMAKE_BINARY_DIR}/CMakeFiles/nm_fuzz_probe
                  RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_QUIET)
  if(_rc EQUAL 0)
    set(NM_FUZZ_OK ON)
  endif()
endif()

if(NM_FUZZ_OK)
  add_custom_command(
    OUTPUT ${CMAKE_BINARY_DIR}/fuzz_indexed
    COMMAND ${NM_CLANG} -std=c11 -D_POSIX_C_SOURCE=200809L -O1 -g -fno-omit-frame-pointer
            -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -Werror
            -Wno-unused-parameter -I${CMAKE_SOURCE_DIR}/src ${NM_FUZZ_SOURCES} -o ${CMAKE_BINARY_DIR}/fuzz_indexed
    DEPENDS ${NM_FUZZ_SOURCES} ${CMAKE_SOURCE_DIR}/src/data/indexed.h
    COMMENT "Building libFuzzer target fuzz_indexed with clang"
    VERBATIM)
  add_custom_target(fuzz_indexed_target ALL DEPENDS ${CMAKE_BINARY_DIR}/fuzz_indexed)
  add_test(NAME fuzz_indexed COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/run_fuzz.sh ${CMAKE_BINARY_DIR}/fuzz_indexed 20000
           WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
else()
  add_test(NAME fuzz_indexed COMMAND sh -c "echo 'fuzz_indexed: clang with libFuzzer not found, skipped'; exit 77")
endif()
set_tests_properties(fuzz_indexed PROPERTIES LABELS "cpu;fuzz" SKIP_RETURN_CODE 77)

# One target per parser of outside input (issue 11): name | sources besides the target | libraries.
# Each runs a short fixed budget here (run_fuzz_target.sh); long runs: see tests/fuzz/README.md.
set(_core ${CMAKE_SOURCE_DIR}/src/core/check.c ${CMAKE_SOURCE_DIR}/src/io/fileio.c ${CMAKE_SOURCE_DIR}/src/core/strdist.c)
set(NM_FUZZ_PARSERS model_config train_config safetensors tokenizer trainer_json)
set(NM_FUZZ_SRC_model_config src/model/config.c)
set(NM_FUZZ_SRC_train_config src/train/train_config.c src/train/schedule.c src/train/optim.c src/model/config.c
    src/io/hf_dir.c src/io/safetensors.c src/model/params.c src/core/rng.c src/ops/cpu/fp8_decode.c)
set(NM_FUZZ_SRC_safetensors src/io/safetensors.c)
set(NM_FUZZ_SRC_tokenizer src/data/tokenizer.c src/data/tokenizer_util.c)
set(NM_FUZZ_SRC_trainer_json src/train/checkpoint.c src/io/table_io.c src/io/safetensors.c src/model/params.c src/core/rng.c
    src/model/config.c src/train/train_config.c src/train/schedule.c src/train/optim.c src/io/hf_dir.c src/dist/comm.c src/ops/cpu/fp8_decode.c)
foreach(t ${NM_FUZZ_PARSERS})
  if(NM_FUZZ_OK)
    set(_srcs ${CMAKE_SOURCE_DIR}/tests/fuzz/fuzz_${t}.c ${_core})
    foreach(s ${NM_FUZZ_SRC_${t}})
      list(APPEND _srcs ${CMAKE_SOURCE_DIR}/${s})
    endforeach()
    add_custom_command(
      OUTPUT ${CMAKE_BINARY_DIR}/fuzz_${t}
      COMMAND ${NM_CLANG} -std=c11 -D_POSIX_C_SOURCE=200809L -O1 -g -fno-omit-frame-pointer
              -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -Werror
              -Wno-unused-parameter -I${CMAKE_SOURCE_DIR}/src ${_srcs} -lcjson -lpcre2-8 -lm -o ${CMAKE_BINARY_DIR}/fuzz_${t}
      DEPENDS ${_srcs}
      COMMENT "Building libFuzzer target fuzz_${t} with clang"
      VERBATIM)
    add_custom_target(fuzz_${t}_target ALL DEPENDS ${CMAKE_BINARY_DIR}/fuzz_${t})
    add_test(NAME fuzz_${t} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/run_fuzz_target.sh ${CMAKE_BINARY_DIR}/fuzz_${t}
             ${t} ${CMAKE_SOURCE_DIR} 5000 WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  else()
    add_test(NAME fuzz_${t} COMMAND sh -c "echo 'fuzz_${t}: clang with libFuzzer not found, skipped'; exit 77")
  endif()
  set_tests_properties(fuzz_${t} PROPERTIES LABELS "cpu;fuzz" SKIP_RETURN_CODE 77)
endforeach()
message(STATUS "nano-megatron: fuzz target fuzz_indexed ${NM_FUZZ_OK} (clang: ${NM_CLANG})")
