# Multi-process tests: helper programs run under mpirun by tests/test_dist_*.sh (and alone).
file(GLOB NM_DIST_CHECKS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/dist/dist_*.c)
foreach(src ${NM_DIST_CHECKS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE nanomegatron_lib)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
endforeach()
