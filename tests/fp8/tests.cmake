# tests/fp8/tests.cmake: the E4M3 quantiser driver used by tests/reference/test_fp8_torch.py
# (included by the top-level CMakeLists.txt). It lands in the build directory, where the
# Python test finds it through NM_BUILD.
add_executable(nm_fp8_oracle ${CMAKE_CURRENT_LIST_DIR}/fp8_oracle.c)
target_link_libraries(nm_fp8_oracle PRIVATE nanomegatron_lib)
set_target_properties(nm_fp8_oracle PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
