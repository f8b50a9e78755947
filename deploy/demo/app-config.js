// OHIF Viewer 3.13 configuration for the viewer demo: OHIF and Orthanc's DICOMweb share one origin
// (Orthanc sends no CORS headers), so every root below is a path on the page's own host.
// Served as /app-config.js by deploy/demo/viewer_proxy.py (`make demo`) and by the nginx of
// deploy/demo/compose.yaml, in place of the one in OHIF's build (which points at a public demo server).
// Why each key is set: ../shared/VIEWERS.md beside the repository.
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Our objects carry their own "AI-generated, not for diagnostic use" text.
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (same origin)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
